"""One warm pool for the whole sandbox test session, checked for leaks after every test.

Docker must be running (`bash .ci/docker.sh`); without it these tests fail with that message
rather than skip.
"""

import pytest

from sandbox import Limits, SandboxPool

# Small limits so the fault tests hit them fast on a 2-core machine.
TEST_LIMITS = Limits(memory_mb=256, pids=64, tmpfs_mb=32, timeout_s=5.0, max_output_bytes=64 * 1024)


@pytest.fixture(scope="session")
def pool():
    p = SandboxPool(size=2, limits=TEST_LIMITS)
    yield p
    p.close()
    assert p.containers() == [], "the pool left containers behind after close()"


@pytest.fixture(autouse=True)
def no_leaks(request):
    yield
    if "pool" not in request.fixturenames:
        return
    p = request.getfixturevalue("pool")
    assert p.wait_settled(), "a container replacement did not finish"
    assert len(p.containers()) <= p.size, f"pool has more containers than slots: {p.containers()}"
    healthy = p.run("print('ok')")
    assert healthy.stdout == "ok\n", f"pool unhealthy after the test: {healthy}"
