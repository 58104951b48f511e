"""Serve a `SandboxPool` over Ray so rollout workers on any node share one machine's warm containers.

`SandboxActor` is a thin shell: every method forwards to the plain pool (which tests call
directly). `serve_pool` starts (or finds) a named actor; `RemotePool` is the client side, with the
same `run` / `session` API as the local pool. More machines means more actors, one per node:
pass all their handles to `RemotePool`, which spreads `run` calls round-robin and pins each
session to the actor that opened it.

Trajectory files named in `session(trajectory=...)` are written on the actor's node.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from sandbox.container import Limits, Result
from sandbox.image import DEFAULT_IMAGE
from sandbox.pool import SandboxPool

log = logging.getLogger(__name__)


class SandboxActor:
    """Ray actor body: one `SandboxPool` on the actor's node."""

    def __init__(self, size: int, image: str, limits: dict | None, max_starting: int, session_ttl_s: float):
        self.pool = SandboxPool(size, image, Limits(**(limits or {})), max_starting=max_starting,
                                session_ttl_s=session_ttl_s)
        # Logs of resumable sessions, on this node, where a restarted actor finds them.
        self.scratch = Path(tempfile.gettempdir()) / "opd-sandbox-trajectories"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.scratch_of: dict[str, Path] = {}  # session id -> its log, removed when the session closes

    def run(self, code: str | None = None, **kwargs: Any) -> dict:
        return self.pool.run(code, **kwargs).to_dict()

    def open_session(self, trajectory: str | None = None, ttl_s: float | None = None) -> str:
        return self.pool.open_session(trajectory, ttl_s)

    def open_resumable(self, ttl_s: float | None = None) -> tuple[str, str]:
        """A session logged to a scratch trajectory, so it survives this actor's restart: (id, log path)."""
        path = self.scratch / f"{uuid.uuid4().hex}.jsonl"
        sid = self.pool.open_session(path, ttl_s)
        self.scratch_of[sid] = path
        return sid, str(path)

    def rebuild_session(self, trajectory: str, ttl_s: float | None = None) -> str:
        """After a restart: the session of `trajectory` in a fresh container, its state re-made; the new id."""
        sid = self.pool.rebuild_session(trajectory, ttl_s)
        if Path(trajectory).parent == self.scratch:
            self.scratch_of[sid] = Path(trajectory)
        return sid

    def session_call(self, sid: str, op: str, args: dict) -> Any:
        return self.pool.session_call(sid, op, **args)

    def close_session(self, sid: str) -> None:
        self.pool.close_session(sid)
        path = self.scratch_of.pop(sid, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def info(self) -> dict:
        """Size, image, containers, counters, live sessions, checkout queue wait p50/p99 (ms), restarts."""
        waits = sorted(self.pool.waits)
        pct = lambda q: round(1000 * waits[min(len(waits) - 1, int(q * len(waits)))], 3) if waits else 0.0  # noqa: E731
        return {"size": self.pool.size, "image": self.pool.image, "containers": self.pool.containers(),
                "stats": dict(self.pool.stats), "live_sessions": self.pool.live_sessions,
                "wait_p50_ms": pct(0.5), "wait_p99_ms": pct(0.99), "restarts": restarts(),
                "node": ray.get_runtime_context().get_node_id()}

    def close(self) -> None:
        self.pool.close()


def restarts() -> int:
    """How many times Ray has restarted this actor (0 outside an actor, or when Ray cannot say)."""
    ctx = ray.get_runtime_context()
    try:
        from ray.util.state import get_actor

        return int(get_actor(ctx.get_actor_id()).num_restarts)
    except Exception:  # no dashboard (an embedded Ray): at least whether it was restarted
        return int(bool(ctx.was_current_actor_reconstructed))


RESTART_WAIT_S = 120.0  # how long a call waits for Ray to restart a dead service before it fails


def get_through_restarts(call, timeout_s: float = RESTART_WAIT_S) -> Any:
    """`ray.get(call())`, sent again while the service it goes to is dead or restarting.

    Only for calls that are safe to repeat: a call in flight when a service dies may or may not have
    run there, and a restarted service reaps the dead one's containers, so nothing it did survives.
    """
    end = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(call())
        except ray.exceptions.RayActorError as e:
            if time.monotonic() > end:
                raise
            log.warning("sandbox service unavailable (%s); retrying", str(e).splitlines()[0][:200])
            time.sleep(1.0)


async def aget_through_restarts(call, timeout_s: float = RESTART_WAIT_S) -> Any:
    """`get_through_restarts` for an event loop."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except ray.exceptions.RayActorError as e:
            if time.monotonic() > end:
                raise
            log.warning("sandbox service unavailable (%s); retrying", str(e).splitlines()[0][:200])
            await asyncio.sleep(1.0)


def serve_pool(
    size: int = 4,
    image: str = DEFAULT_IMAGE,
    limits: Limits | None = None,
    *,
    name: str = "sandbox-pool",
    max_starting: int = 4,
    session_ttl_s: float = 900.0,
    **actor_options: Any,
) -> ray.actor.ActorHandle:
    """Start the named pool actor, or return the one already serving under `name`.

    The actor is threaded (`max_concurrency` well above `size`) so callers queue inside the
    pool's own FIFO rather than in Ray's mailbox. Pass e.g. `scheduling_strategy=` to pin it to a node.
    """
    options = {"name": name, "get_if_exists": True, "max_concurrency": max(16, 8 * size), "num_cpus": 0}
    options.update(actor_options)
    cls = ray.remote(SandboxActor).options(**options)
    return cls.remote(size, image, limits.model_dump() if limits else None, max_starting, session_ttl_s)


class RemotePool:
    """Client for one or more pool actors, with the local pool's `run` / `session` API."""

    def __init__(self, actors: ray.actor.ActorHandle | list[ray.actor.ActorHandle]):
        self.actors = actors if isinstance(actors, list) else [actors]
        self._next = itertools.cycle(self.actors)
        self._lock = threading.Lock()

    # Every call below survives a service that Ray is restarting: each runs in a fresh container, so
    # sending it again is safe.
    @property
    def size(self) -> int:
        """Containers the served pools keep, together."""
        return sum(get_through_restarts(lambda a=a: a.info.remote())["size"] for a in self.actors)

    def _pick(self) -> ray.actor.ActorHandle:
        with self._lock:
            return next(self._next)

    def run(self, code: str | None = None, **kwargs: Any) -> Result:
        return Result(**get_through_restarts(lambda: self._pick().run.remote(code, **kwargs)))

    async def arun(self, code: str | None = None, **kwargs: Any) -> Result:
        return Result(**await aget_through_restarts(lambda: self._pick().run.remote(code, **kwargs)))

    def session(self, trajectory: str | Path | None = None, ttl_s: float | None = None,
                actor: ray.actor.ActorHandle | None = None) -> RemoteSession:
        """Open (or, with an existing trajectory file, resume) a session; resume on the same `actor`.

        Without `trajectory` the actor logs the session to a scratch file of its own, so that if the
        actor dies and Ray restarts it, the session is rebuilt there and the caller goes on.
        """
        actor = actor or self._pick()
        if trajectory is None:
            sid, log_path = get_through_restarts(lambda: actor.open_resumable.remote(ttl_s))
            return RemoteSession(actor, sid, log_path)
        sid = get_through_restarts(lambda: actor.open_session.remote(str(trajectory), ttl_s))
        return RemoteSession(actor, sid, str(trajectory))


class RemoteSession:
    """`Session` over Ray: the container stays with the actor, so a dead worker can resume it."""

    def __init__(self, actor: ray.actor.ActorHandle, sid: str, trajectory: str | None = None):
        self.actor, self.id, self.trajectory = actor, sid, trajectory

    def _call(self, op: str, **args: Any) -> Any:
        try:
            return ray.get(self.actor.session_call.remote(self.id, op, args))
        except ray.exceptions.RayActorError as e:
            if self.trajectory is None:
                raise
            self._rebuild(e)
            return ray.get(self.actor.session_call.remote(self.id, op, args))

    def _rebuild(self, error: Exception, timeout_s: float = RESTART_WAIT_S) -> None:
        """The actor died mid-episode: once Ray has restarted it, rebuild the session from its log.

        A call in flight when the actor died was not logged, so it is sent again; one that was
        logged but whose reply was lost would run twice (a window of one log write).
        """
        log.warning("sandbox service died during session %s (%s); rebuilding it from %s", self.id,
                    str(error).splitlines()[0], self.trajectory)
        self.id = get_through_restarts(lambda: self.actor.rebuild_session.remote(self.trajectory), timeout_s)

    def exec(self, cmd: str | list[str], *, stdin: str | None = None, timeout: float | None = None) -> Result:
        return Result(**self._call("exec", cmd=cmd, stdin=stdin, timeout=timeout))

    def python(self, code: str, *, stdin: str | None = None, timeout: float | None = None) -> Result:
        return Result(**self._call("exec", code=code, stdin=stdin, timeout=timeout))

    def check(self, cmd: str | list[str], *, files: dict[str, str] | None = None, timeout: float) -> Result:
        return Result(**self._call("check", cmd=cmd, files=files or {}, timeout=timeout))

    def write_file(self, path: str, content: str) -> None:
        self._call("write_file", path=path, content=content)

    def read_file(self, path: str, max_bytes: int | None = None) -> str:
        return self._call("read_file", path=path, max_bytes=max_bytes)

    def close(self) -> None:
        try:
            ray.get(self.actor.close_session.remote(self.id))
        except ray.exceptions.RayActorError:  # the actor died: its restart reaps the container
            pass

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
