"""Run untrusted code and agent tool calls in warm, locked-down Docker containers.

Our analogue of DeepSeek's DSec for one machine: `SandboxPool` keeps warm containers, `run`
borrows one per call and resets it, `session` holds one for a multi-turn agent episode and logs
every call to a trajectory file that a restarted worker can replay. `sandbox.actor` serves a pool
over Ray so rollout workers on any node share it; more machines means more pools behind the same
actor API (`sandbox.actor`). `sandbox.toolcall` parses and formats the agent's XML tool calls;
`sandbox.episode` has the task schema and `Episode`, the stepper every agent episode runs on
(`run_episode` plays one from a task YAML; `rollout.episodes` steps a batch of them).

Speed comes from a small exec server that is each container's PID 1 (`sandbox/server.py`): the
host sends JSON lines over the container's attached stdin, so no `docker exec` per command, and
Python code runs in a forked copy of the server (dropped to the sandbox user) instead of a fresh
interpreter.

Covered (each has an adversarial test, named after the file):
- no network: `--network none`, only a loopback interface (test_faults);
- read-only root filesystem; writable space is two small tmpfs mounts (/work, /tmp), plus
  /dev/shm (16 MiB) and /dev/mqueue; no host path is mounted, so host files are not visible (test_faults);
- user code runs as 65534 with no capabilities and no-new-privileges (setuid bits are inert);
  the exec server is a different uid, root with only SETUID, SETGID and KILL (test_faults);
- the control channel is out of reach (test_channel): user code shares neither uid nor file
  descriptors with the server; file tools refuse symlinks at every path component, FIFOs,
  sockets and devices (quickly, without blocking) and paths outside /work; every reply must
  echo its request's random id, and a box whose reply is out of step is destroyed and replaced;
- a reset restores a known state or the container is replaced (test_reset; the list is in
  `SandboxPool`'s docstring): no processes, /work and /tmp empty with their owner, mode and no
  xattrs, /dev/shm and /dev/mqueue empty, no SysV shared memory, message queues or semaphores;
- a task's check cannot be gamed by what the agent left (test_check, `sandbox.episode.run_check`):
  every process of the episode is killed first, the task's `check_files` are written fresh (a
  planted symlink is replaced, a package or extension module that would shadow a check module is
  removed), and the check runs with a fixed PATH and environment (no HOME, no user site, no
  bytecode cache beside sources, PYTHONSAFEPATH);
- resource limits: pids (fork bombs), memory with swap disabled (memory bombs are OOM-killed and
  reported as `oom_killed`), CPU quota, open files; every limit and timeout is finite and bounded
  (`Limits`, at most 3600 s per exec), a bad one is a ValueError or a one-line CLI error (test_limits);
- per exec: wall-clock timeout (the whole process group is killed), captured output capped
  (truncated and flagged) while the rest is drained so the writer never blocks;
- a container that dies, is `docker kill`ed, or fails its reset is destroyed and replaced; the
  caller gets an error `Result`, never a hang;
- no leaks: every container carries the label `opd.sandbox` plus its owner's pid; a new pool
  removes containers whose owner died; `python -m sandbox gc` does the same by hand;
- starts are capped (`max_starting`) and each has a deadline (`Limits.start_timeout_s`).

Not covered (honest shortcuts):
- the kernel is shared: this is runc + seccomp-default isolation, not gVisor/Firecracker. A
  kernel exploit escapes (and would reach the root exec server). Use a VM-backed runtime for
  hostile code at scale;
- user code could still exhaust pids or memory so that the server cannot fork; that shows up
  as an error or timeout Result and the container is replaced;
- within a session, background processes are killed at the end of each exec (the process group),
  but a process that escapes its group with setsid survives until the check or the release;
- a check runs the agent's solution, so a solution that exits 0 on import or patches the test at
  run time passes a naive check; a task whose check imports the solution should compare results
  outside the solution's process if that matters;
- Python code runs in a fork of the server, so freed memory of the server (earlier requests of
  the same container, e.g. a previous run's code or files) may still be readable by later user
  code; nothing in it can alter a result, but do not send secrets through a shared pool;
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
