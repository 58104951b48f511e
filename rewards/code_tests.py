"""Code reward: run the completion's last ```python block against the sample's unit tests in the sandbox.

`sample["meta"]["tests"]` is a list of Python test snippets (usually one `assert` each) that run
after the solution, in its namespace. Each sample is one `SandboxPool.run` (a fresh, locked-down
container state: no network, read-only root, memory/pid/time limits; see `sandbox`), and the
batch runs through the pool concurrently. Score: 1.0 only if every test passes (`mode: all`) or
the fraction that pass (`mode: fraction`).

The harness prints its report after a nonce it reads from stdin before the solution runs, so
printing a fake report does not work. Not covered (honest shortcut): the solution runs in the
harness's process, so code written to game the harness (reading the harness source, patching
builtins, returning objects whose __eq__ is always True) can fake passing tests. The sandbox keeps
such code from harming the host or other samples; it does not make the test verdict tamper-proof.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Sequence

from rewards.base import RewardResult, Sample
from rewards.format import answer_text

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)```", re.S | re.I)

HARNESS = r'''
import contextlib, io, json, os, sys
nonce = sys.stdin.readline().strip()
tests = json.load(open("tests.json"))
os.remove("tests.json")
src = open("solution.py").read()
out = sys.stdout
report = {"passed": [], "error": None}
ns = {"__name__": "solution"}
try:
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(src, "solution.py", "exec"), ns)
except BaseException as e:
    report["error"] = ("solution raised %s: %s" % (type(e).__name__, e))[:300]
if report["error"] is None:
    for t in tests:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(t, "test", "exec"), dict(ns))
            report["passed"].append(True)
        except BaseException:
            report["passed"].append(False)
out.write("\n" + nonce + json.dumps(report) + "\n")
out.flush()
'''


def extract_code(completion: str) -> str | None:
    """The last ```python block of the visible answer, or None.

    >>> extract_code("<think>```python\\nx=0\\n```</think>\\n```python\\ndef f():\\n    return 1\\n```")
    'def f():\\n    return 1\\n'
    >>> extract_code("no code here") is None
    True
    """
    blocks = _BLOCK.findall(answer_text(completion))
    return blocks[-1] if blocks else None


def score_run(result: Any, nonce: str, n_tests: int, mode: str) -> RewardResult:
    """Turn one sandbox `Result` of the harness into a score."""
    details = {"exit_code": result.exit_code, "duration": round(result.duration, 3)}
    if result.timed_out:
        return RewardResult(0.0, f"timed out after {result.duration:.1f}s", details)
    if result.oom_killed:
        return RewardResult(0.0, "killed: out of memory", details)
    if result.error:
        return RewardResult(0.0, f"sandbox error: {result.error}"[:300], details)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith(nonce)), None)
    if line is None:
        return RewardResult(0.0, f"no test report (exit code {result.exit_code})", details)
    report = json.loads(line[len(nonce):])
    if report["error"]:
        return RewardResult(0.0, report["error"], details)
    passed = sum(report["passed"])
    details.update(passed=passed, total=n_tests)
    frac = passed / n_tests
    score = frac if mode == "fraction" else float(passed == n_tests)
    return RewardResult(score, None if passed == n_tests else f"failed {n_tests - passed} of {n_tests} tests", details)


class CodeReward:
    """Pass rate of the completion's code on `meta["tests"]`, run concurrently in a sandbox pool.

    Pass `pool` to share one (`sandbox.SandboxPool`); otherwise the node's sandbox service is used
    (`sandbox.service`), or where none runs one of `pool_size` containers is started on first use
    and closed with `close()`.
    """

    name = "code"

    def __init__(self, mode: Literal["all", "fraction"] = "all", timeout_s: float = 10.0, pool: Any = None,
                 pool_size: int = 4, image: str | None = None):
        if mode not in ("all", "fraction"):
            raise ValueError(f"mode must be 'all' or 'fraction', got {mode!r}")
        self.mode, self.timeout_s = mode, timeout_s
        self.pool, self._owns_pool = pool, pool is None
        self.pool_size, self.image = pool_size, image

    def _pool(self):
        if self.pool is None:  # this node's sandbox service, else a private pool
            from sandbox.service import node_pool

            self.pool, self._owns_pool = node_pool(self.pool_size, self.image)
        return self.pool

    def score_one(self, sample: Sample) -> RewardResult:
        tests = (sample.get("meta") or {}).get("tests")
        if isinstance(tests, str):
            tests = [tests]
        if not tests:
            return RewardResult(0.0, "sample has no tests")
        code = extract_code(sample["completion"])
        if code is None:
            return RewardResult(0.0, "no ```python block in the answer")
        nonce = secrets.token_hex(16)
        result = self._pool().run(HARNESS, files={"solution.py": code, "tests.json": json.dumps(tests)},
                                  stdin=nonce + "\n", timeout=self.timeout_s)
        return score_run(result, nonce, len(tests), self.mode)

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        pool = self._pool()
        with ThreadPoolExecutor(max_workers=max(1, 2 * pool.size), thread_name_prefix="code-reward") as ex:
            return list(ex.map(self.score_one, samples))

    def close(self) -> None:
        if self._owns_pool and self.pool is not None:
            self.pool.close()
            self.pool = None
