"""One sandbox service per node: a named Ray actor serving that node's warm Docker pool.

The workflow runner starts one on every live node when the workflow has a `sandbox:` block
(`ServiceConfig`) and stops them when the run ends. Every component that needs containers (code
rewards, agent rollouts, agent rewards, eval) calls `node_pool()`, which hands back a client for the
service on the caller's own node; only where no service runs (a library caller, a test) does it
build a private pool, as before. Services live in their own Ray namespace, so every stage's driver
(a Ray task of `pipeline run`, or a job of `pipeline submit`) finds the same ones.

Ray restarts a service that dies (`max_restarts`); the new one reaps the containers the dead one
left (their owner pid is gone) and warms a fresh pool. A session open on it is not lost: every
service session logs its calls to a trajectory file on the node, and the client
(`sandbox.actor.RemoteSession`) rebuilds it in a fresh container by re-running the logged calls,
then goes on with the call that failed.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sandbox.container import Limits
from sandbox.image import DEFAULT_IMAGE

log = logging.getLogger(__name__)

NAMESPACE = "opd-sandbox"


class ServiceConfig(BaseModel):
    """A workflow's `sandbox:` block: the pool each node's service keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(4, ge=1, le=4096, description="Containers each node's pool keeps (warm, and at most).")
    image: str = Field(DEFAULT_IMAGE, min_length=1, max_length=256, description="Sandbox image (built offline by "
                       "`python -m sandbox build-image` or .ci/docker.sh).")
    limits: Limits = Field(default_factory=Limits, description="Per-container limits (memory, CPUs, pids, timeouts).")
    max_starting: int = Field(4, ge=1, le=256, description="Containers started at once while warming.")
    session_ttl_s: float = Field(900.0, gt=0, le=86400, description="A session untouched this long is reclaimed.")


def service_name(node_id: str) -> str:
    return f"sandbox-{node_id[:16]}"


def start_services(cfg: ServiceConfig) -> dict[str, Any]:
    """Start (or find) the service on every live node with CPUs; returns {node id: actor}, warmed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from sandbox.actor import serve_pool

    actors = {}
    for node in ray.nodes():
        if node["Alive"] and node["Resources"].get("CPU", 0) > 0:
            nid = node["NodeID"]
            actors[nid] = serve_pool(cfg.size, cfg.image, cfg.limits, name=service_name(nid), namespace=NAMESPACE,
                                     max_starting=cfg.max_starting, session_ttl_s=cfg.session_ttl_s,
                                     max_restarts=-1, lifetime="detached",
                                     scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False))
    ray.get([a.info.remote() for a in actors.values()])  # up and warm before any stage asks
    log.info("sandbox services: %d node(s), %d container(s) each", len(actors), cfg.size)
    return actors


def stop_services() -> int:
    """Close every node's service (destroying its containers) and end it; returns how many there were."""
    import ray

    found = services()
    for actor in found:
        try:
            ray.get(actor.close.remote(), timeout=120)
        except Exception as e:  # a dead node's service: its containers went with it
            log.warning("a sandbox service did not close cleanly: %s", e)
        ray.kill(actor, no_restart=True)
    return len(found)


def local_service():
    """The service on this process's node, or None (no Ray, or the workflow has no `sandbox:` block)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_actor(service_name(ray.get_runtime_context().get_node_id()), namespace=NAMESPACE)
    except (ImportError, ValueError):
        return None


def node_pool(size: int, image: str | None = None) -> tuple[Any, bool]:
    """(pool, owned): a client of this node's service (not ours to close), else a private pool of `size`."""
    actor = local_service()
    if actor is not None:
        from sandbox.actor import RemotePool

        return RemotePool(actor), False
    from sandbox.pool import SandboxPool

    return SandboxPool(size=size, image=image or DEFAULT_IMAGE), True


def services() -> list:
    """Every node's service that is running (none without Ray or a `sandbox:` block)."""
    import ray

    if not ray.is_initialized():
        return []
    found = []
    for node in ray.nodes():
        try:
            found.append(ray.get_actor(service_name(node["NodeID"]), namespace=NAMESPACE))
        except ValueError:
            pass
    return found


def service_metrics() -> dict[str, float]:
    """The services as stage metrics: live sessions and restarts (summed over nodes), checkout queue wait
    p50 / p99 in ms (the worst node's); {} when none runs."""
    from sandbox.actor import get_through_restarts

    infos = [get_through_restarts(lambda a=a: a.info.remote()) for a in services()]
    if not infos:
        return {}
    return {"sandbox/live_sessions": sum(i["live_sessions"] for i in infos),
            "sandbox/queue_wait_p50_ms": max(i["wait_p50_ms"] for i in infos),
            "sandbox/queue_wait_p99_ms": max(i["wait_p99_ms"] for i in infos),
            "sandbox/restarts": sum(i["restarts"] for i in infos)}
