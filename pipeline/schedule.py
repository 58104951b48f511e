"""Run a workflow's stage graph: start every stage whose needs are done, as many at once as fit.

One scheduler for `pipeline run` (each stage a Ray task) and `pipeline submit` (each stage a Ray
job). A stage is started when its needs have finished, fewer than `max_parallel` stages run, and
the Ray resources it declares (its module's `resources(cfg)`: learner group, rollout actors, ...)
fit beside those of the stages already running; a stage bigger than the whole cluster still runs,
alone, as it would have before. Admitting only what fits is what keeps two stages from each
holding half of what both need, waiting on each other forever.

When a stage fails, nothing new starts; the stages running finish, and the first failure is raised.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Protocol

from pipeline.config import StageFailed, UserError, Workflow

log = logging.getLogger(__name__)

Resources = Mapping[str, float]


class Launcher(Protocol):
    def start(self, name: str) -> None:
        """Start stage `name` without waiting for it."""

    def wait_one(self) -> tuple[str, Exception | None]:
        """Block until one started stage ends: (its name, None, or the UserError / StageFailed it ended with)."""


def fits(need: Resources, used: Resources, capacity: Resources) -> bool:
    """Whether `need` fits beside `used` in `capacity` (a resource the cluster lacks counts as 0).

    >>> fits({"CPU": 1}, {"CPU": 1}, {"CPU": 2}), fits({"CPU": 1, "GPU": 1}, {}, {"CPU": 4})
    (True, False)
    """
    return all(used.get(k, 0.0) + v <= capacity.get(k, 0.0) + 1e-9 for k, v in need.items() if v > 0)


def run_graph(wf: Workflow, todo: list[str], finished: set[str], launcher: Launcher,
              demand: Callable[[str], Resources], capacity: Resources, max_parallel: int | None = None) -> list[str]:
    """Run the stages in `todo` (workflow order); `finished` are done already. Returns the order they ended in.

    Raises the first stage's error once nothing is running any more.
    """
    pending, running, ended = list(todo), {}, []
    done = set(finished)
    failure: tuple[str, Exception] | None = None
    while pending or running:
        while failure is None and (max_parallel is None or len(running) < max_parallel):
            used = {k: sum(r.get(k, 0.0) for r in running.values()) for k in capacity}
            ready = [n for n in pending if all(d in done for d in wf.stages[n].needs)]
            nxt = next((n for n in ready if not running or fits(demand(n), used, capacity)), None)
            if nxt is None:
                break
            pending.remove(nxt)
            running[nxt] = demand(nxt)
            log.info("stage %s: starting%s", nxt, f" beside {', '.join(running.keys() - {nxt})}" if len(running) > 1 else "")
            launcher.start(nxt)
        if not running:
            if failure is None and pending:  # needs that can never finish: validation makes this unreachable
                raise UserError(f"{wf.path}: stages {', '.join(pending)} wait on stages that never ran")
            break
        name, err = launcher.wait_one()
        running.pop(name)
        ended.append(name)
        if err is None:
            done.add(name)
        elif failure is None:
            failure = (name, err)
            if running:
                log.error("stage %s failed; starting nothing new, waiting for %s", name, ", ".join(running))
        else:
            log.error("stage %s also failed: %s", name, err)
    if failure is not None:
        raise failure[1]
    return ended


def stage_error(kind: str, message: str) -> Exception:
    """Rebuild a stage's error on the driver from (kind, message): bad input exits 2, a failed stage 1."""
    return UserError(message) if kind == "user" else StageFailed(message)
