"""The exec server that runs as PID 1 inside every sandbox container (stdlib only).

The host starts each container with `python3 -c <this file's source>` and talks to it over the
container's attached stdin/stdout: one JSON object per line each way. One long-lived channel
instead of a `docker exec` per command is what makes a warm exec cost milliseconds.

Why PID 1: the kernel drops signals sent to a namespace's init from inside that namespace unless
it installed a handler, so user code (same uid) cannot kill the server; and as init it reaps
orphans. It also marks itself non-dumpable, so same-uid user code cannot ptrace it or open
/proc/1/fd/* to forge replies on the channel.

Requests: {"op": "ping"} | {"op": "exec", "argv": [...], "stdin": b64, "files": {path: b64},
"timeout": s, "max_output": bytes, "kill_group": bool} | {"op": "write", "path", "data": b64} |
{"op": "read", "path", "max_bytes"} | {"op": "reset"}.  Replies carry "ok" and the op's fields.
"""

import base64
import ctypes
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time

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


def run(req):
    for path, data in (req.get("files") or {}).items():
        write(path, base64.b64decode(data))
    cap = int(req.get("max_output", 1 << 20))
    timeout = float(req.get("timeout", 10))
    stdin = base64.b64decode(req.get("stdin") or "")
    oom_before = oom_kills()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            req["argv"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=WORK, env=ENV, start_new_session=True, preexec_fn=child_setup, close_fds=True,
        )
    except OSError as e:  # e.g. EAGAIN when the pids limit is exhausted
        return {"ok": True, "stdout": "", "stderr": base64.b64encode(str(e).encode()).decode(),
                "exit_code": 126, "timed_out": False, "oom_killed": False, "truncated": False,
                "duration": time.monotonic() - start}
    out_fd, err_fd, in_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
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
        proc.stdin.close()
    pending = memoryview(stdin)
    deadline = start + timeout
    timed_out = False
    exited_at = None
    while sel.get_map():
        now = time.monotonic()
        if proc.poll() is not None and exited_at is None:
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
                except (BrokenPipeError, OSError):
                    pending = pending[:0]
                if not pending:
                    sel.unregister(fd)
                    proc.stdin.close()
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                sel.unregister(fd)
                continue
            buf = bufs[fd]
            room = cap - len(bufs[out_fd]) - len(bufs[err_fd])
            if len(chunk) > room:
                truncated = True
                chunk = chunk[: max(0, room)]
            buf += chunk  # past the cap we keep draining (and dropping) so the writer never blocks
    if not timed_out:
        try:  # pipes closed: the process is exiting, or closed them and runs on
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out or req.get("kill_group", True):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    code = proc.wait()
    sel.close()
    for f in (proc.stdout, proc.stderr, proc.stdin):
        try:
            f.close()
        except OSError:
            pass
    reap()
    oom_after = oom_kills()
    return {
        "ok": True,
        "stdout": base64.b64encode(bytes(bufs[out_fd])).decode(),
        "stderr": base64.b64encode(bytes(bufs[err_fd])).decode(),
        "exit_code": 128 - code if code < 0 else code,
        "timed_out": timed_out,
        "oom_killed": oom_after > oom_before >= 0,
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
