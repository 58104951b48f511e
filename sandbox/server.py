"""The exec server that runs as PID 1 inside every sandbox container (stdlib only).

The host starts each container with `python3 -c <this file's source>` and talks to it over the
container's attached stdin/stdout: one JSON object per line each way. One long-lived channel
instead of a `docker exec` per command is what makes a warm exec cost milliseconds.

Why user code cannot reach the channel: the server and the code it runs never share an identity
or a protocol file descriptor.
- The server is root inside the container with every capability dropped except SETUID, SETGID
  (to drop children's privileges) and KILL (to kill the user's processes); no DAC_OVERRIDE, so
  root here cannot even read a file the sandbox user made private.
- Every child drops to uid/gid 65534 with no supplementary groups (setgroups, setgid, setuid)
  after its stdin/stdout/stderr became fresh pipes and every other fd was closed; under
  no-new-privileges it can never regain root. A different uid cannot signal, ptrace or open
  /proc/1/fd/* of the server (which is also non-dumpable), so fds 0 and 1 of PID 1, the channel,
  are out of reach.
- File tools (`write`, `read`, and exec's `files`) act for the user (effective uid 65534), walk
  the path one component at a time with O_NOFOLLOW from /work, refuse symlinks at every
  component, `..` and absolute paths outside /work, and refuse anything but a regular file
  (opened O_NONBLOCK, checked with fstat before reading), so neither `/proc/self/fd/1` behind a
  symlink nor a FIFO can turn a file tool into a write to the channel or a stalled server.
- Every request carries an `id` that its reply echoes; the host destroys a container whose reply
  is out of step (`sandbox/container.py`).
As PID 1 the server also reaps orphans, and the kernel drops signals sent to a namespace's init.

Requests (each with "id"): {"op": "ping"} | {"op": "exec", "argv": [...] or "python": code,
"stdin": b64, "files": {path: b64}, "timeout": s, "max_output": bytes, "kill_group": bool} |
{"op": "write", "path", "data": b64} | {"op": "read", "path", "max_bytes"} | {"op": "kill"} |
{"op": "check", exec's fields, "files" written fresh} | {"op": "reset"}.
Replies carry "id", "ok" and the op's fields.
"""

import atexit
import base64
import contextlib
import ctypes
import errno
import io
import json
import os
import selectors
import signal
import stat
import sys
import time
import traceback  # imported up front so forked children do not pay for it
import importlib.machinery
import types

WORK = "/work"
SCRATCH = ("/work", "/tmp")  # the user's tmpfs mounts: owned by the user, mode 1777
IPC_DIRS = ("/dev/shm", "/dev/mqueue")  # root-owned, mode 1777: the user's files there go on reset
USER = 65534  # uid and gid of every process that runs user code (nobody:nogroup)
ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORK,
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}
# A task's check sees nothing the agent could have planted in its environment: no home (so no
# ~/.local usercustomize or .pth files), no bytecode cache next to sources, and Python does not
# put the script's directory first on sys.path (a check imports the solution explicitly, after
# the standard library, so a /work/json.py cannot shadow `json`).
CHECK_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/nonexistent",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
    "PYTHONPYCACHEPREFIX": "/nonexistent",
    "PYTHONSAFEPATH": "1",
    "PYTHONUNBUFFERED": "1",
}


class Refused(ValueError):
    """A file tool will not touch this path (symlink, special file, outside /work)."""


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
    """SIGKILL every other process in the container (kill(-1) spares only ourselves) until none is left.

    Root with CAP_KILL may signal every process, setsid'd or not.
    """
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


@contextlib.contextmanager
def as_user():
    """Act on the filesystem and IPC objects as the sandbox user (effective ids only).

    The real and saved uid stay 0, so user code still cannot signal or ptrace the server.
    """
    os.setegid(USER)
    os.seteuid(USER)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def parts_of(path):
    """`path` as components below /work; refuses absolute paths elsewhere, `..` and empty names.

    >>> parts_of("a/./b.txt"), parts_of("/work/c")
    (['a', 'b.txt'], ['c'])
    """
    rel = path[len(WORK) + 1:] if path.startswith(WORK + "/") else path
    parts = [p for p in rel.split("/") if p != "."]
    if not rel or rel.startswith("/") or "\0" in rel or not parts or any(p in ("", "..") for p in parts):
        raise Refused(f"{path!r} is not a path inside {WORK} (absolute paths elsewhere and '..' are refused)")
    return parts


def kind(st):
    return {stat.S_IFLNK: "a symlink", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory",
            stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}.get(stat.S_IFMT(st.st_mode), "not a regular file")


def refuse(where, dir_fd, name):
    """The Refused error that says what `where` (ending in `name`) is, after an open refused it."""
    try:
        what = kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
    except OSError:
        what = "not a regular file"
    return Refused(f"{where} is {what}; file tools only follow real directories to regular files")


def open_dir(parts, create):
    """An O_PATH fd of /work/<parts...>, each component opened O_NOFOLLOW (mkdir'd if `create`)."""
    fd = os.open(WORK, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            if create:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise refuse("/".join(parts[: i + 1]), fd, name) from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_file(path, flags, create=False, fresh=False):
    """Open a regular file below /work as the user, never through a symlink or onto a FIFO/socket.

    `fresh` first removes whatever is at the path (file, symlink, directory tree), and anything
    that would shadow it as a Python module, then creates it anew.
    """
    parts = parts_of(path)
    with as_user():
        dfd = open_dir(parts[:-1], create)
        try:
            name = parts[-1]
            if fresh:
                for entry in (name, *shadows(name)):
                    remove_at(dfd, entry)
                flags |= os.O_EXCL
            try:
                fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                             | (os.O_CREAT if create else 0), 0o644, dir_fd=dfd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR):
                    raise refuse("/".join(parts), dfd, name) from None
                raise
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise Refused(f"{'/'.join(parts)} is {kind(st)}; file tools only read and write regular files")
            return fd
        finally:
            os.close(dfd)


def write(path, data, fresh=False):
    fd = open_file(path, os.O_WRONLY, create=True, fresh=fresh)
    try:
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read(path, cap):
    fd = open_file(path, os.O_RDONLY)
    try:
        chunks, got = [], 0
        while got <= cap:
            chunk = os.read(fd, min(1 << 20, cap + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def remove_at(dir_fd, name):
    """Remove `name` (a file, symlink or whole tree, whatever its modes) in `dir_fd`; never follows links.

    Runs only when no user process is alive (reset, check), so nothing can swap a directory for a
    link between the stat and the open; O_NOFOLLOW guards that anyway.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    if st.st_mode & 0o700 != 0o700:
        os.chmod(name, 0o700, dir_fd=dir_fd)  # the user owns it: a `chmod 000` dir must not stop the wipe
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for entry in os.listdir(fd):
            remove_at(fd, entry)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def shadows(name):
    """Entries beside a check module `name.py` that Python's import would pick before it.

    >>> shadows("helper.py")[0], shadows("helper.py")[-1]
    ('helper', 'helper.so')
    """
    if not name.endswith(".py"):
        return []
    stem = name[:-3]
    return [stem, *(stem + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES)]


LIBC = ctypes.CDLL(None)
PR_SET_DUMPABLE = 4


def child_setup():
    """In a forked child, after its fds were replaced: become the sandbox user for good.

    Order matters: oom_score_adj is raised while still root (children are the OOM killer's first
    choice, so a memory bomb never takes the server down), then groups, gid and uid are dropped
    (setuid from root with CAP_SETUID sets all three uids and clears every capability), then the
    child is made dumpable again so its own /proc/self belongs to it.
    """
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    os.setgroups([])
    os.setgid(USER)
    os.setuid(USER)
    if os.getuid() != USER or os.geteuid() != USER or os.getegid() != USER:
        raise PermissionError("could not drop to the sandbox user")
    LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)


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


def spawn(req, env):
    """fork a child in its own session with fresh pipes; it execs argv or runs Python code in place.

    Returns (pid, stdin write fd, stdout read fd, stderr read fd).
    """
    pipes = [os.pipe() for _ in range(3)]  # (r, w) for stdin, stdout, stderr
    pid = os.fork()
    if pid == 0:  # child: never return from here
        try:
            os.setsid()
            os.dup2(pipes[0][0], 0)
            os.dup2(pipes[1][1], 1)
            os.dup2(pipes[2][1], 2)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the host channel was fds 0 and 1, now replaced
            child_setup()  # only now, with no protocol fd left, does the child become the user
            os.chdir(WORK)
            os.environ.clear()
            os.environ.update(env)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            if req.get("python") is not None:
                signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as python3 sets it at start-up
                run_python(req["python"])
            argv = req["argv"]
            os.execvpe(argv[0], argv, env)
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


def run(req, env=ENV):
    for path, data in (req.get("files") or {}).items():
        write(path, base64.b64decode(data))
    cap = int(req.get("max_output", 1 << 20))
    timeout = float(req.get("timeout", 10))
    stdin = base64.b64decode(req.get("stdin") or "")
    oom_before = oom_kills()
    start = time.monotonic()
    try:
        pid, in_fd, out_fd, err_fd = spawn(req, env)
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


def remove_sysv_ipc():
    """IPC_RMID every SysV shared memory segment, message queue and semaphore set (as their creator)."""
    ipc_rmid = 0
    rm = {"shm": lambda i: LIBC.shmctl(i, ipc_rmid, None), "msg": lambda i: LIBC.msgctl(i, ipc_rmid, None),
          "sem": lambda i: LIBC.semctl(i, 0, ipc_rmid)}
    for name, remove in rm.items():
        for ident in sysv_ids(name):
            remove(ident)


def sysv_ids(name):
    """Ids of the SysV objects of one kind in this IPC namespace (/proc/sysvipc lists them all)."""
    with open(f"/proc/sysvipc/{name}") as f:
        return [int(line.split()[1]) for line in f.read().splitlines()[1:] if line.strip()]


def user_xattrs(path):
    return [a for a in os.listxattr(path, follow_symlinks=False) if a.startswith("user.")]


def wipe():
    """As the user: restore /work and /tmp (empty, mode 1777, no xattrs), empty /dev/shm and /dev/mqueue,
    remove SysV IPC objects. Errors are left for `verify` to find."""
    with as_user():
        for d in SCRATCH + IPC_DIRS:
            try:
                if d in SCRATCH:
                    os.chmod(d, 0o1777)  # the user owns its tmpfs roots and may have chmod-ed them
                    for attr in user_xattrs(d):
                        os.removexattr(d, attr)
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    for name in os.listdir(fd):
                        remove_at(fd, name)
                finally:
                    os.close(fd)
            except (OSError, RecursionError):
                pass
        remove_sysv_ipc()


def verify():
    """What a reset promises, checked as root after the wipe; a list of what is not so."""
    problems = [f"process {pid} survived" for pid in others()]
    for d in SCRATCH + IPC_DIRS:
        try:
            left = os.listdir(d)
            st = os.stat(d, follow_symlinks=False)
        except OSError as e:
            problems.append(f"{d}: {e}")
            continue
        if left:
            problems.append(f"{d} still holds {sorted(left)[:5]}")
        if d in SCRATCH:
            if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (USER, USER, 0o1777):
                problems.append(f"{d} is {st.st_uid}:{st.st_gid} mode {stat.S_IMODE(st.st_mode):o}")
            attrs = user_xattrs(d)
            if attrs:
                problems.append(f"{d} keeps xattrs {attrs}")
    for name in ("shm", "msg", "sem"):
        if sysv_ids(name):
            problems.append(f"SysV {name} objects survived")
    return problems


def reset():
    """Bring the container back to the state a fresh one starts in, or say why it is not."""
    killed = kill_all()
    wipe()
    problems = verify() if killed else ["processes survived SIGKILL"]
    return {"ok": not problems, "error": "; ".join(problems) or None}


def check(req):
    """A task's check: kill every process of the session, write the check's files fresh, run it in CHECK_ENV.

    Killing first means no background process (setsid'd or not) can rewrite a file after it is
    written; `fresh` replaces whatever the agent left at each path (a symlink is removed, never
    followed) and removes entries that would shadow a check module on import.
    """
    if not kill_all():
        return {"ok": False, "error": "could not kill the session's processes before the check"}
    for path, data in (req.get("files") or {}).items():
        write(path, base64.b64decode(data), fresh=True)
    return run({**req, "files": None}, env=CHECK_ENV)


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
        cap = int(req.get("max_bytes", 1 << 20))
        data = read(req["path"], cap)
        return {"ok": True, "data": base64.b64encode(data[:cap]).decode(), "truncated": len(data) > cap}
    if op == "kill":
        return {"ok": kill_all()}
    if op == "check":
        return check(req)
    if op == "reset":
        return reset()
    return {"ok": False, "error": f"unknown op {op!r}"}


def main():
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # belt and braces: /proc/1/* root-owned, no ptrace
    os.setgroups([])  # root's supplementary groups would follow the server into `as_user`
    os.umask(0o022)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    for line in inp:
        req = {}
        try:
            req = json.loads(line)
            reply = handle(req)
        except Refused as e:
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 -- any failure becomes a reply, never a dead server
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply["id"] = req.get("id") if isinstance(req, dict) else None
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
