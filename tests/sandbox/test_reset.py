"""A reset gives the next holder a container in its starting state, or a new container.

Each case plants one leak through the real pool, then the next run (same container: the pool
has one) looks for it. The list matches what `SandboxPool`'s docstring promises.
"""

import pytest

from sandbox import SandboxPool
from tests.sandbox.conftest import TEST_LIMITS

LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
NO_SYSV = "tail -q -n +2 /proc/sysvipc/shm /proc/sysvipc/msg /proc/sysvipc/sem | wc -l"

# (leak, plant, probe, what the probe prints on a clean container)
LEAKS = [
    ("process", "setsid sleep 300 </dev/null >/dev/null 2>&1 &",
     "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep", "0"),
    ("files in /work and /tmp", "mkdir -p d/e && echo x > d/e/f && chmod 000 d/e d && echo y > /tmp/t",
     "ls -A /work /tmp | tr -d '\\n'", "/tmp:/work:"),
    ("/dev/shm", "head -c 1000000 /dev/zero > /dev/shm/leak", "ls -A /dev/shm | wc -l", "0"),
    ("POSIX message queue",
     "python3 -c 'import ctypes, os; q = ctypes.CDLL(\"librt.so.1\").mq_open(b\"/leak\", os.O_CREAT | os.O_RDWR, 0o600, None); assert q >= 0'",
     "ls -A /dev/mqueue | wc -l", "0"),
    ("SysV shared memory", f"python3 -c '{LIBC}assert libc.shmget(0, 1 << 20, 0o1000) >= 0'", NO_SYSV, "0"),
    ("SysV message queue", f"python3 -c '{LIBC}assert libc.msgget(0, 0o1000) >= 0'", NO_SYSV, "0"),
    ("SysV semaphore set", f"python3 -c '{LIBC}assert libc.semget(0, 1, 0o1000) >= 0'", NO_SYSV, "0"),
    ("user xattrs on /work and /tmp",
     "python3 -c 'import os\nfor d in (\"/work\", \"/tmp\"): os.setxattr(d, \"user.leak\", b\"1\")'",
     "python3 -c 'import os; print(os.listxattr(\"/work\") + os.listxattr(\"/tmp\"))'", "[]"),
    ("modes of /work and /tmp", "chmod 555 /work /tmp",
     "echo a > /work/a && echo b > /tmp/b && stat -c '%a %u:%g' /work /tmp | tr '\\n' ' '",
     "1777 65534:65534 1777 65534:65534"),
]


@pytest.fixture(scope="module")
def pool():
    """One container, so the next run lands where the leak was planted."""
    p = SandboxPool(size=1, limits=TEST_LIMITS)
    yield p
    p.close()


@pytest.mark.parametrize("leak, plant, probe, clean", LEAKS, ids=[case[0] for case in LEAKS])
def test_a_reset_leaves_nothing_for_the_next_holder(pool, leak, plant, probe, clean):
    assert pool.run(cmd=probe).stdout.strip() == clean  # the probe sees a clean container as clean
    [name] = pool.containers()
    planted = pool.run(cmd=plant)
    assert planted.exit_code == 0, planted
    assert pool.run(cmd=probe).stdout.strip() == clean, f"{leak} survived the reset"
    assert pool.containers() == [name]  # undone by the reset itself, not by a new container


def test_state_the_reset_cannot_undo_gets_a_new_container(pool):
    [name] = pool.containers()
    # Deeper than the server's open-file limit and recursion depth: the wipe cannot finish.
    deep = pool.run("import os\nfor _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n", timeout=20)
    assert deep.exit_code == 0, deep
    assert pool.run(cmd="ls -A /work").stdout == ""
    assert pool.wait_settled() and name not in pool.containers()
