"""Every limit is finite and bounded: a bad timeout is a clear error, and the pool serves on."""

import re

import pytest
from pydantic import ValidationError

from sandbox import Limits
from sandbox.episode import Task

BAD_TIMEOUTS = [float("inf"), float("-inf"), float("nan"), -1, 0, 1e9]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS)
def test_a_bad_timeout_is_a_value_error_naming_it_and_the_next_run_works(pool, timeout):
    with pytest.raises(ValueError, match=re.escape(f"timeout {timeout} ")):
        pool.run("print(1)", timeout=timeout)
    with pool.session() as s, pytest.raises(ValueError, match=re.escape(f"timeout {timeout} ")):
        s.exec("echo hi", timeout=timeout)
    assert pool.run("print(1)", timeout=5).stdout == "1\n"  # nothing leaked, nothing hangs


@pytest.mark.parametrize("field, value", [
    ("timeout_s", float("inf")), ("timeout_s", -1), ("memory_mb", 10**9), ("memory_mb", 0), ("cpus", float("inf")),
    ("cpus", 0), ("pids", 0), ("pids", 10**9), ("tmpfs_mb", -1), ("tmpfs_mb", 10**9), ("max_output_bytes", 10**12),
    ("start_timeout_s", float("inf")),
])
def test_limits_reject_unbounded_values(field, value):
    with pytest.raises(ValidationError, match=field):
        Limits(**{field: value})


def test_a_task_timeout_is_bounded():
    with pytest.raises(ValidationError, match="timeout_s"):
        Task(name="t", prompt="p", check="true", timeout_s=float("inf"))
