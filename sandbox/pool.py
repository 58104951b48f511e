"""`SandboxPool`: one machine's pool of warm, hardened containers with a fair queue and sessions."""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import logging
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import docker.errors

from sandbox.container import LABEL, Box, Limits, Result, SandboxError, check_timeout, docker_client, is_orphan
from sandbox.image import DEFAULT_IMAGE
from sandbox.trajectory import Trajectory

log = logging.getLogger(__name__)

def command_argv(cmd: str | list[str]) -> list[str]:
    """A shell string runs under bash -c; a list is an argv.

    >>> command_argv("echo hi | wc -c")
    ['bash', '-c', 'echo hi | wc -c']
    """
    return ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)


def listed(client, label: str = LABEL) -> list[dict]:
    """The daemon's one-call listing of containers carrying `label`: [{id, name, labels, status, image}].

    Not `containers.list()`, which inspects each container after listing and fails with NotFound
    when another pool on the same daemon removes one in between.
    """
    return [{"id": c["Id"], "name": (c.get("Names") or ["/?"])[0].lstrip("/"), "labels": c.get("Labels") or {},
             "status": c.get("State", "?"), "image": c.get("Image", "?")}
            for c in client.api.containers(all=True, filters={"label": label})]


def reap_orphans(client, everything: bool = False) -> list[str]:
    """Remove sandbox containers whose owning process is dead (or all of them); returns their names."""
    removed = []
    for c in listed(client):
        if everything or is_orphan(c["labels"]):
            try:
                client.api.remove_container(c["id"], force=True)
                removed.append(c["name"])
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code != 409:
                    raise
                # 409: another pool starting at the same moment is already removing it
    if removed:
        log.info("removed %d leaked sandbox container(s): %s", len(removed), ", ".join(removed))
    return removed


class _Waiter:
    """One caller in the FIFO queue: handed either an idle box or the right to start one."""

    def __init__(self):
        self.event = threading.Event()
        self.box: Box | None = None
        self.may_start = False


class _Lease:
    def __init__(self, box: Box, traj: Trajectory | None, ttl_s: float):
        self.box, self.traj, self.ttl_s = box, traj, ttl_s
        self.expires = time.monotonic() + ttl_s
        self.lock = threading.Lock()  # one call at a time per session


class SandboxPool:
    """Keeps `size` warm containers; `run` borrows one per call, `session` holds one per episode.

    At most `size` execs run at once; further callers wait in strict FIFO order. At most
    `max_starting` containers start at once and each start has a deadline (`limits.start_timeout_s`).
    A container that died, timed out at the channel level, answered out of step, or failed its
    reset is destroyed and replaced in the background; a healthy one is reset and reused.

    What a reset guarantees to the next holder (each line is a case of
    `tests/sandbox/test_reset.py::test_a_reset_leaves_nothing_for_the_next_holder`, which plants
    the leak through the real pool and looks for it from the next run):
    - no process of the previous holder is alive, setsid'd or not (root SIGKILLs all but PID 1);
    - /work and /tmp are empty, owned by 65534, mode 1777, with no user xattrs (a `chmod 555`
      or `setfattr` on them is undone);
    - /dev/shm (16 MiB) and /dev/mqueue (POSIX message queues) are empty;
    - no SysV shared memory segment, message queue or semaphore set exists (IPC namespace is private);
    - the wipe runs as the sandbox user, then root checks each point above; if any fails (say a
      directory tree too deep to remove) the container is destroyed and replaced, never reused.
    The rest of the container cannot be changed from inside: the root filesystem is read-only,
    and the user cannot write /dev, /etc's bind mounts or anything root owns.
    """

    def __init__(
        self,
        size: int = 2,
        image: str = DEFAULT_IMAGE,
        limits: Limits | None = None,
        *,
        max_starting: int = 4,
        session_ttl_s: float = 900.0,
        warm: bool = True,
    ):
        self.size, self.image = size, image
        self.limits = limits or Limits()
        self.session_ttl_s = session_ttl_s
        self.pool_id = uuid.uuid4().hex[:12]
        self.client = docker_client(timeout=self.limits.start_timeout_s)
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            raise SandboxError(f"image {image!r} not found locally: run `python -m sandbox build-image`") from None
        reap_orphans(self.client)
        self._lock = threading.Lock()
        self._idle: list[Box] = []
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._n_live = 0  # boxes existing or being started
        self._replacing = 0  # background destroy/refill threads in flight
        self._max_starting = max_starting
        self._start_slots = threading.BoundedSemaphore(max_starting)
        self._sessions: dict[str, _Lease] = {}
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max(32, 4 * size), "sandbox-async")
        self.stats = collections.Counter()
        self.waits: collections.deque[float] = collections.deque(maxlen=4096)  # seconds each checkout queued
        self._stop = threading.Event()
        threading.Thread(target=self._expire_loop, name="sandbox-lease", daemon=True).start()
        self._finalizer = weakref.finalize(self, SandboxPool._destroy_all, self._lock, self._idle, self._sessions)
        atexit.register(self._finalizer)
        if warm:
            self._warm_up()

    # -- public API ----------------------------------------------------------------------------
    def run(
        self,
        code: str | None = None,
        *,
        cmd: str | list[str] | None = None,
        files: dict[str, str | bytes] | None = None,
        stdin: str | bytes | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Run Python `code` (as `python3 -c`) or a shell `cmd` in a fresh-state container.

        Never raises for anything the code does; a sandbox failure is a Result with `error` set.
        """
        if (code is None) == (cmd is None):
            raise ValueError("pass exactly one of code= or cmd=")
        if timeout is not None:
            timeout = check_timeout(timeout)  # a ValueError naming the value, before any container is taken
        argv = None if cmd is None else command_argv(cmd)
        try:
            box = self._checkout()
        except SandboxError as e:
            return Result.failed(str(e))
        try:
            result = box.exec(argv, python=code, files=files, stdin=stdin, timeout=timeout)
        except BaseException:
            box.dead = True  # unknown state: replace it rather than hand it on
            raise
        finally:
            self._checkin(box)
        return result

    async def arun(self, code: str | None = None, **kwargs: Any) -> Result:
        """`run` for asyncio callers (waits in the same FIFO queue, off the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self.run(code, **kwargs))

    def session(self, trajectory: str | Path | None = None, ttl_s: float | None = None) -> Session:
        """Hold one container for a multi-turn episode (`with pool.session() as s:`).

        With `trajectory`, every call is appended to that JSONL file. If the file already holds a
        session that this pool still keeps alive (its worker died mid-episode), the session is
        resumed: the logged calls are answered from the log, not re-run, then execution continues.
        """
        return Session(self, self.open_session(trajectory, ttl_s))

    def open_session(self, trajectory: str | Path | None = None, ttl_s: float | None = None) -> str:
        """Open (or resume) a session and return its id; the id-based API is what the Ray actor serves."""
        ttl_s = self.session_ttl_s if ttl_s is None else ttl_s
        traj = Trajectory(Path(trajectory)) if trajectory is not None else None
        if traj is not None and traj.session_id is not None:
            if traj.closed:
                raise SandboxError(f"{trajectory}: that episode already finished; use a new trajectory file")
            with self._lock:
                lease = self._sessions.get(traj.session_id)
            if lease is None:
                raise SandboxError(
                    f"{trajectory}: session {traj.session_id} is no longer alive (container gone or lease "
                    "expired); its state cannot be rebuilt without re-running commands, so restart the episode")
            with lease.lock:
                lease.traj = traj
                lease.expires = time.monotonic() + lease.ttl_s
            log.info("resuming session %s: %d logged call(s) will be replayed", traj.session_id, len(traj.replay))
            return traj.session_id
        box = self._checkout()
        sid = uuid.uuid4().hex[:12]
        if traj is not None:
            traj.start(sid, self.image)
        with self._lock:
            self._sessions[sid] = _Lease(box, traj, ttl_s)
        return sid

    def rebuild_session(self, trajectory: str | Path, ttl_s: float | None = None) -> str:
        """A session whose container is gone (its pool died and was restarted): a fresh container,
        the trajectory's state-changing calls (exec, write_file) run again in order, then a new id.

        The caller has already seen those calls' results, so nothing is answered from the log; it
        goes on with its next call. Exact when the logged commands are deterministic, as a task's are.
        """
        traj = Trajectory(Path(trajectory))
        if traj.session_id is None or traj.closed:
            raise SandboxError(f"{trajectory}: no open session to rebuild")
        box = self._checkout()
        try:
            for rec in traj.replay:
                if rec["op"] in ("exec", "write_file"):
                    self._do(box, rec["op"], dict(rec["args"]))
        except BaseException:
            box.dead = True
            self._checkin(box)
            raise
        traj.skip_replay()
        sid = uuid.uuid4().hex[:12]
        traj.restart(sid)
        with self._lock:
            self._sessions[sid] = _Lease(box, traj, self.session_ttl_s if ttl_s is None else ttl_s)
        log.info("rebuilt session %s from %s: %d call(s) re-run", sid, trajectory, len(traj.replay))
        return sid

    def session_call(self, sid: str, op: str, **args: Any) -> Any:
        """One session operation: exec (cmd|code, stdin, timeout), check (cmd, files, timeout),
        write_file, read_file.

        exec and check return a Result dict; read_file returns text; write_file returns None.
        """
        if args.get("timeout") is not None:
            args["timeout"] = check_timeout(args["timeout"])
        with self._lock:
            lease = self._sessions.get(sid)
        if lease is None:
            raise SandboxError(f"session {sid} is closed or expired")
        with lease.lock:
            lease.expires = time.monotonic() + lease.ttl_s
            if lease.traj is not None and lease.traj.has_replay():
                return lease.traj.replay_next(op, args)
            out = self._do(lease.box, op, args)
            if lease.traj is not None:
                lease.traj.append(op, args, out)
            lease.expires = time.monotonic() + lease.ttl_s
            return out

    def close_session(self, sid: str) -> None:
        """Release the session's container: reset and reuse it, or destroy and replace it."""
        with self._lock:
            lease = self._sessions.pop(sid, None)
        if lease is None:
            return
        with lease.lock:
            if lease.traj is not None:
                lease.traj.close()
            self._checkin(lease.box)

    def wait_settled(self, timeout: float = 30.0) -> bool:
        """Wait until no container is being destroyed or replaced (tests use it before counting)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if self._replacing == 0:
                    return True
            time.sleep(0.02)
        return False

    @property
    def live_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def containers(self) -> list[str]:
        """Names of the containers that exist for this pool, as the daemon sees them."""
        return [c["name"] for c in listed(self.client, f"{LABEL}.pool={self.pool_id}")]

    def ps(self) -> list[dict]:
        """Live sandbox containers on this daemon (every pool's, not only ours)."""
        return list_sandboxes(self.client)

    def close(self) -> None:
        """Destroy every container this pool owns."""
        self._closed = True
        self._stop.set()
        self._finalizer()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _do(self, box: Box, op: str, args: dict) -> Any:
        if op == "exec":
            cmd = args.get("cmd")
            argv = None if cmd is None else command_argv(cmd)
            return box.exec(argv, python=args.get("code"), stdin=args.get("stdin"),
                            timeout=args.get("timeout")).to_dict()
        if op == "check":
            return box.check(command_argv(args["cmd"]), args.get("files") or {}, args["timeout"]).to_dict()
        if op == "write_file":
            box.write_file(args["path"], args["content"])
            return None
        if op == "read_file":
            return box.read_file(args["path"], args.get("max_bytes")).decode("utf-8", "replace")
        raise ValueError(f"unknown session op {op!r}")

    def _warm_up(self) -> None:
        with self._lock:
            n = self.size - self._n_live
            self._n_live += n
        # All n starts queue for `max_starting` slots at once: the last waits for n / max_starting
        # starts, each bounded by its own deadline, so a wait of one deadline would fail a big pool.
        slot_wait_s = self.limits.start_timeout_s * -(-n // self._max_starting)
        futures = [self._executor.submit(self._start_box, slot_wait_s) for _ in range(n)]
        errors = []
        for f in futures:
            try:
                self._checkin(f.result())
            except Exception as e:  # noqa: BLE001 -- collected and re-raised below
                with self._lock:
                    self._n_live -= 1
                errors.append(e)
        if errors:
            self.close()
            raise SandboxError(f"could not start {len(errors)}/{n} sandbox(es): {errors[0]}")

    def _start_box(self, slot_wait_s: float | None = None) -> Box:
        wait = self.limits.start_timeout_s if slot_wait_s is None else slot_wait_s
        if not self._start_slots.acquire(timeout=wait):
            raise SandboxError(f"no start slot within {wait:g}s (too many containers starting)")
        try:
            t0 = time.monotonic()
            box = Box(self.client, self.image, self.limits, self.pool_id)
            self.stats["started"] += 1
            log.debug("started %s in %.2fs", box.name, time.monotonic() - t0)
            return box
        except Exception as e:
            self.stats["start_failed"] += 1
            raise SandboxError(f"starting a sandbox from {self.image} failed: {e}") from e
        finally:
            self._start_slots.release()

    def _checkout(self) -> Box:
        if self._closed:
            raise SandboxError("pool is closed")
        queued = time.monotonic()
        with self._lock:
            waiter = _Waiter()
            self._waiters.append(waiter)
            self._dispatch()
        waiter.event.wait()
        self.waits.append(time.monotonic() - queued)
        if waiter.box is not None:
            return waiter.box
        try:
            return self._start_box()
        except SandboxError:
            with self._lock:
                self._n_live -= 1
                self._dispatch()
            raise

    def _dispatch(self) -> None:
        """Hand idle boxes (or start rights) to waiters, oldest first. Caller holds the lock."""
        while self._waiters and (self._idle or self._n_live < self.size):
            w = self._waiters.popleft()
            if self._idle:
                w.box = self._idle.pop()
            else:
                self._n_live += 1
                w.may_start = True
            w.event.set()

    def _checkin(self, box: Box) -> None:
        if not box.dead and not self._closed and box.reset():
            with self._lock:
                self._idle.append(box)
                self._dispatch()
            return
        self.stats["replaced"] += 1
        with self._lock:
            self._n_live -= 1
            self._replacing += 1
        # Destroying takes a daemon round trip; do it (and the refill) off the caller's path.
        threading.Thread(target=self._replace, args=(box,), daemon=True).start()

    def _replace(self, box: Box) -> None:
        try:
            self._destroy_and_refill(box)
        finally:
            with self._lock:
                self._replacing -= 1

    def _destroy_and_refill(self, box: Box) -> None:
        box.destroy()
        with self._lock:
            if self._closed or self._n_live >= self.size or self._waiters:
                self._dispatch()  # waiters start their own box; keeps start order FIFO
                return
            self._n_live += 1
        try:
            self._checkin(self._start_box())
        except SandboxError as e:
            log.warning("could not refill the pool: %s", e)
            with self._lock:
                self._n_live -= 1
                self._dispatch()

    def _expire_loop(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self._lock:
                # A lease whose lock is held is mid-call: a long exec is not idleness.
                expired = [sid for sid, lease in self._sessions.items()
                           if lease.expires < now and not lease.lock.locked()]
            for sid in expired:
                with self._lock:
                    lease = self._sessions.pop(sid, None)
                if lease is not None:
                    log.warning("session %s expired after %.0fs idle; destroying its sandbox", sid, lease.ttl_s)
                    lease.box.dead = True  # unknown state: never reuse
                    self._checkin(lease.box)

    @staticmethod
    def _destroy_all(lock: threading.Lock, idle: list[Box], sessions: dict[str, _Lease]) -> None:
        with lock:
            boxes = list(idle) + [lease.box for lease in sessions.values()]
            idle.clear()
            sessions.clear()
        for box in boxes:
            box.destroy()


class Session:
    """A container held for one episode; state (files) persists between calls until `close`."""

    def __init__(self, pool: SandboxPool, sid: str):
        self.pool, self.id = pool, sid

    def exec(self, cmd: str | list[str], *, stdin: str | None = None, timeout: float | None = None) -> Result:
        """Run a shell command (string, via bash -c) or an argv in /work."""
        return Result(**self.pool.session_call(self.id, "exec", cmd=cmd, stdin=stdin, timeout=timeout))

    def python(self, code: str, *, stdin: str | None = None, timeout: float | None = None) -> Result:
        """Run a Python program in /work."""
        return Result(**self.pool.session_call(self.id, "exec", code=code, stdin=stdin, timeout=timeout))

    def check(self, cmd: str | list[str], *, files: dict[str, str] | None = None, timeout: float) -> Result:
        """Score the session: kill all its processes, write `files` fresh, run `cmd` in a clean environment.

        Use `sandbox.episode.run_check(session, task)`, which passes a task's check and check files.
        """
        return Result(**self.pool.session_call(self.id, "check", cmd=cmd, files=files or {}, timeout=timeout))

    def write_file(self, path: str, content: str) -> None:
        """Write `content` to `path` (inside /work; symlinks and special files are refused)."""
        self.pool.session_call(self.id, "write_file", path=path, content=content)

    def read_file(self, path: str, max_bytes: int | None = None) -> str:
        """Read a file (capped at `max_bytes`, default the output cap)."""
        return self.pool.session_call(self.id, "read_file", path=path, max_bytes=max_bytes)

    def close(self) -> None:
        self.pool.close_session(self.id)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_sandboxes(client) -> list[dict]:
    """Every container carrying our label, with its state and whether its owner is gone."""
    return [{"name": c["name"], "status": c["status"], "image": c["image"],
             "pool": c["labels"].get(f"{LABEL}.pool", "?"), "owner_pid": c["labels"].get(f"{LABEL}.pid", "?"),
             "orphan": is_orphan(c["labels"])} for c in listed(client)]
