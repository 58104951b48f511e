"""Run untrusted code and agent tool calls in warm, locked-down Docker containers.

Our analogue of DeepSeek's DSec for one machine: `SandboxPool` keeps warm containers, `run`
borrows one per call and resets it, `session` holds one for a multi-turn agent episode and logs
every call to a trajectory file that a restarted worker can replay. `sandbox.actor` serves a pool
over Ray so rollout workers on any node share it; more machines means more pools behind the same
actor API (`sandbox.actor`). `sandbox.toolcall` parses and formats the agent's XML tool calls;
`sandbox.episode` plays one agent episode from a task YAML.

Speed comes from a small exec server that is each container's PID 1 (`sandbox/server.py`): the
host sends JSON lines over the container's attached stdin, so no `docker exec` per command, and
Python code runs in a forked copy of the server instead of a fresh interpreter.

Covered (each has an adversarial test in tests/sandbox/test_faults.py):
- no network: `--network none`, only a loopback interface;
- read-only root filesystem; writable space is two small tmpfs mounts (/work, /tmp), wiped on
  release; no host path is mounted, so host files are not visible;
- non-root user (65534), all capabilities dropped, no-new-privileges (setuid bits are inert);
- resource limits: pids (fork bombs), memory with swap disabled (memory bombs are OOM-killed and
  reported as `oom_killed`), CPU quota, open files;
- per exec: wall-clock timeout (the whole process group is killed), captured output capped
  (truncated and flagged) while the rest is drained so the writer never blocks;
- a container that dies, is `docker kill`ed, or fails its reset is destroyed and replaced; the
  caller gets an error `Result`, never a hang;
- no leaks: every container carries the label `opd.sandbox` plus its owner's pid; a new pool
  removes containers whose owner died; `python -m sandbox gc` does the same by hand;
- starts are capped (`max_starting`) and each has a deadline (`Limits.start_timeout_s`).

Not covered (honest shortcuts):
- the kernel is shared: this is runc + seccomp-default isolation, not gVisor/Firecracker. A
  kernel exploit escapes. Use a VM-backed runtime for hostile code at scale;
- the exec server runs as PID 1 under the same uid as user code. Signals from inside the
  container cannot kill it and it is non-dumpable (no ptrace, no /proc/1/fd), but user code could
  still exhaust pids or memory so that the server cannot fork; that shows up as an error or
  timeout Result and the container is replaced;
- within a session, background processes are killed at the end of each exec (the process group),
  but a process that escapes its group with setsid survives until the session is released;
- CPU time is limited only by the quota and the wall-clock timeout, disk I/O is not throttled,
  and the daemon's own cgroup v1 accounting is trusted for `oom_killed`;
- `run(code)` runs in a fork of the server's interpreter, like `python3 -c` but with the
  server's few stdlib modules already imported; use `cmd=["python3", ...]` for a pristine one;
- the tool-call format reserves one string: a parameter body cannot contain `</parameter>`;
- resume-by-replay needs the session's container to still be alive (its lease outlives the
  worker); if the container is gone the episode must restart. A call that was in flight when
  the worker died has no logged result and runs again.
"""

from sandbox.container import Limits, Result, SandboxError
from sandbox.image import DEFAULT_IMAGE, build_image
from sandbox.pool import SandboxPool, Session

__all__ = ["DEFAULT_IMAGE", "Limits", "Result", "SandboxError", "SandboxPool", "Session", "build_image"]
