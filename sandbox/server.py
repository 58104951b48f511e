"""The exec server that runs as PID 1 inside every sandbox container (stdlib only).

The host starts each container with `python3 -c <this file's source>` and talks to it over the
container's attached stdin/stdout: one JSON object per line each way. One long-lived channel
instead of a `docker exec` per command is what makes a warm exec cost milliseconds.

Why PID 1: the kernel drops signals sent to a namespace's init from inside that namespace unless
it installed a handler, so user code (same uid) cannot kill the server; and as init it reaps
orphans. It also marks itself non-dumpable, so same-uid user code cannot ptrace it or open
/proc/1/fd/* to forge replies on the channel.

Requests: {"op": "ping"} | {"op": "exec", "argv": [...] or "python": code, "stdin": b64, "files": {path: b64},
"timeout": s, "max_output": bytes, "kill_group": bool} | {"op": "write", "path", "data": b64} |
{"op": "read", "path", "max_bytes"} | {"op": "reset"}.  Replies carry "ok" and the op's fields.
"""

import atexit
import base64
import ctypes
import io
import json
import os
import selectors
import shutil
import signal
import sys
import time
import traceback  # imported up front so forked children do not pay for it
import types

WORK = "/work"
SCRATCH = ("/work", "/tmp")
ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORK,
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}


def oom_kills():
    """The cgroup's OOM-kill counter (v1 memory.oom_control or v2 memory.events); -1 if unknown."""
    for path in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
        try:
            with open(path) as f:
                for line in f:
                    key, _, val = line.partition(" ")
                    if key == "oom_kill":
                        return int(val)
        except OSError:
            pass
    return -1


def reap():
    """Collect every exited child (as init we inherit orphans)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def others():
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def kill_all(deadline_s=3.0):
    """SIGKILL every other process in the container (kill(-1) spares only ourselves) until none is left."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reap()
        if not others():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.005)


def in_work(path):
    full = os.path.normpath(os.path.join(WORK, path))
    if not (full == WORK or full.startswith(WORK + "/") or full.startswith("/tmp/")):
        raise ValueError(f"path {path!r} is outside {WORK} and /tmp")
    return full


def write(path, data):
    full = in_work(path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(data)


LIBC = ctypes.CDLL(None)
PR_SET_DUMPABLE = 4


def child_setup():
    # The server is non-dumpable (see main) and children inherit that; make them ordinary again,
    # else /proc/self is root-owned and they cannot even raise their own oom_score_adj.
    LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    # Children are the OOM killer's first choice, so a memory bomb never takes the server down.
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")


def run_python(code):
    """In a forked child: run `code` as `python3 -c` would, without paying interpreter start-up.

    The child is a copy of this interpreter, so modules the server imported are already loaded;
    otherwise it behaves like `python3 -c CODE` in /work: __name__ == "__main__", sys.argv == ["-c"],
    "" first on sys.path, exit status from SystemExit, traceback and status 1 on an exception,
    non-daemon threads joined and atexit handlers run before exiting.
    """
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(open(0, "rb", closefd=False), encoding="utf-8")
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = io.TextIOWrapper(open(fd, "wb", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", write_through=True)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    sys.argv = ["-c"]
    sys.path[0:0] = [""]
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    status = 0
    try:
        exec(compile(code, "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        if e.code is None:
            status = 0
        elif isinstance(e.code, int):
            status = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException as e:  # noqa: BLE001 -- as the interpreter would: print it, exit 1
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # hide this frame
        status = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    os._exit(status)


def spawn(req):
    """fork a child in its own session with fresh pipes; it execs argv or runs Python code in place.

    Returns (pid, stdin write fd, stdout read fd, stderr read fd).
    """
    pipes = [os.pipe() for _ in range(3)]  # (r, w) for stdin, stdout, stderr
    pid = os.fork()
    if pid == 0:  # child: never return from here
        try:
            os.setsid()
            child_setup()
            os.dup2(pipes[0][0], 0)
            os.dup2(pipes[1][1], 1)
            os.dup2(pipes[2][1], 2)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the host channel was fds 0 and 1, now replaced
            os.chdir(WORK)
            os.environ.clear()
            os.environ.update(ENV)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            if req.get("python") is not None:
                signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as python3 sets it at start-up
                run_python(req["python"])
            argv = req["argv"]
            os.execvpe(argv[0], argv, ENV)
        except BaseException as e:  # noqa: BLE001 -- e.g. command not found
            try:
                os.write(2, f"{e}\n".encode())
            finally:
                os._exit(127 if isinstance(e, FileNotFoundError) else 126)
    for r, w in pipes:
        os.close(r if (r, w) == pipes[0] else w)
    return pid, pipes[0][1], pipes[1][0], pipes[2][0]


def wait_status(pid, block):
    """The child's status (shell convention: 128+N when killed by signal N), or None if running."""
    try:
        got, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return -1
    if got == 0:
        return None
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run(req):
    for path, data in (req.get("files") or {}).items():
        write(path, base64.b64decode(data))
    cap = int(req.get("max_output", 1 << 20))
    timeout = float(req.get("timeout", 10))
    stdin = base64.b64decode(req.get("stdin") or "")
    oom_before = oom_kills()
    start = time.monotonic()
    try:
        pid, in_fd, out_fd, err_fd = spawn(req)
    except OSError as e:  # e.g. EAGAIN when the pids limit is exhausted
        return {"ok": True, "stdout": "", "stderr": base64.b64encode(f"sandbox: {e}\n".encode()).decode(),
                "exit_code": 126, "timed_out": False, "oom_killed": False, "truncated": False,
                "duration": time.monotonic() - start}
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    truncated = False
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    if stdin:
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    else:
        os.close(in_fd)
        in_fd = -1
    pending = memoryview(stdin)
    deadline = start + timeout
    timed_out = False
    code = None
    exited_at = None
    while sel.get_map():
        now = time.monotonic()
        if code is None:
            code = wait_status(pid, block=False)
            if code is not None:
                exited_at = now
        # Background children may hold the pipes open after the main process exits: give them a
        # short grace, then stop listening rather than wait for them.
        if exited_at is not None and now - exited_at > 0.05:
            break
        if now > deadline:
            timed_out = True
            break
        for key, _ in sel.select(timeout=min(0.05, max(0.0, deadline - now))):
            fd = key.fd
            if fd == in_fd:
                try:
                    n = os.write(fd, pending[:65536])
                    pending = pending[n:]
                except OSError:
                    pending = pending[:0]
                if not pending:
                    sel.unregister(fd)
                    os.close(fd)  # EOF for the child
                    in_fd = -1
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                sel.unregister(fd)
                continue
            room = cap - len(bufs[out_fd]) - len(bufs[err_fd])
            if len(chunk) > room:
                truncated = True
                chunk = chunk[: max(0, room)]
            bufs[fd] += chunk  # past the cap we keep draining (and dropping) so the writer never blocks
    if code is None and not timed_out:
        # Pipes closed: the process is exiting, or closed them and runs on until the deadline.
        while code is None and time.monotonic() < deadline:
            code = wait_status(pid, block=False)
            if code is None:
                time.sleep(0.001)
        timed_out = code is None
    if timed_out or req.get("kill_group", True):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if code is None:
        code = wait_status(pid, block=True)
    sel.close()
    for fd in (in_fd, out_fd, err_fd):
        if fd >= 0:
            os.close(fd)
    reap()
    return {
        "ok": True,
        "stdout": base64.b64encode(bytes(bufs[out_fd])).decode(),
        "stderr": base64.b64encode(bytes(bufs[err_fd])).decode(),
        "exit_code": code,
        "timed_out": timed_out,
        "oom_killed": oom_kills() > oom_before >= 0,
        "truncated": truncated,
        "duration": time.monotonic() - start,
    }


def reset():
    ok = kill_all()
    for d in SCRATCH:
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except OSError:
                    pass
    left = [n for d in SCRATCH for n in os.listdir(d)]
    return {"ok": ok and not left, "error": None if ok and not left else f"reset left {left or 'processes'}"}


def handle(req):
    op = req.get("op")
    if op == "ping":
        return {"ok": True, "pid": os.getpid(), "uid": os.getuid()}
    if op == "exec":
        return run(req)
    if op == "write":
        write(req["path"], base64.b64decode(req["data"]))
        return {"ok": True}
    if op == "read":
        with open(in_work(req["path"]), "rb") as f:
            data = f.read(int(req.get("max_bytes", 1 << 20)) + 1)
        cap = int(req.get("max_bytes", 1 << 20))
        return {"ok": True, "data": base64.b64encode(data[:cap]).decode(), "truncated": len(data) > cap}
    if op == "reset":
        return reset()
    return {"ok": False, "error": f"unknown op {op!r}"}


def main():
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace by same-uid code; /proc/1/* root-owned
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    for line in inp:
        try:
            reply = handle(json.loads(line))
        except Exception as e:  # noqa: BLE001 -- any failure becomes a reply, never a dead server
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
