"""A small warm sandbox pool for the rewards that run code or agent episodes (one per test module)."""

import pytest

from sandbox import Limits, SandboxPool


@pytest.fixture(scope="module")
def pool():
    p = SandboxPool(size=2, limits=Limits(memory_mb=256, pids=64, tmpfs_mb=32, timeout_s=5.0))
    yield p
    p.close()
