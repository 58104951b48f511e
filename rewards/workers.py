"""Rewards on Ray: each worker is a thin actor around `CombinedReward`, the driver shards batches.

Inside an actor, `CombinedReward` isolates a raising, NaN or slow reward per sample (synchronous
Ray actors run on the process's main thread, so `rewards.base.deadline` works there). The driver
adds the backstop for what that cannot stop: an actor that dies (segfault, OOM) or hangs in C past
`batch_timeout_s` scores its shard 0.0 with the reason, is killed and replaced, and the run goes on.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Sequence

import ray

from pipeline.config import UserError
from rewards.base import REWARDS, RewardResult, Sample, register
from rewards.combine import CombinedReward, RewardSpec, reward_metrics

log = logging.getLogger(__name__)

@ray.remote
class RewardActor:
    """A `CombinedReward` in its own process; `registered` carries rewards added with `register`."""

    def __init__(self, spec: RewardSpec, model_path: Callable[[str], Path], registered: dict):
        for name, factory in registered.items():
            register(name, factory)
        self.reward = CombinedReward(spec, model_path)

    def score(self, samples: list[Sample]) -> list[RewardResult]:
        return self.reward(samples)


def never_started(e: Exception) -> None:
    """Raise UserError if `e` says a reward actor could not even be built (a custom reward's module that
    imports in the driver but not in a worker, say): a replacement would fail the same way, forever, and
    score every sample 0."""
    text = str(e)
    if "creation task" not in text:  # Ray: "The actor died because of an error raised in its creation task"
        return
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(lines) if re.match(r"[\w.]+(Error|Exception)\b", ln)), lines[-1] if lines else "")
    raise UserError(f"reward workers cannot build the rewards: {cause}; a custom reward's module must import in "
                    f"every Ray worker (PYTHONPATH or an installed package, not sys.path in the driver)")


class RayRewardPool:
    """Score batches with `num_workers` reward actors; the same call shape as `CombinedReward`.

    `model_path` resolves `spec.reward_model` (pass `ctx.model_path`); it runs on the driver so
    actors get a plain path.
    """

    def __init__(
        self,
        spec: RewardSpec,
        num_workers: int = 1,
        model_path: Callable[[str], Path] = Path,
        batch_timeout_s: float | None = None,
        num_cpus: float = 1,
    ):
        self.spec = spec
        resolved = str(model_path(spec.reward_model)) if spec.reward_model else None
        self._model_path = (lambda _: Path(resolved)) if resolved else Path
        self.num_workers = num_workers
        self.num_cpus = num_cpus
        self.batch_timeout_s = batch_timeout_s
        self.actors = [self._start() for _ in range(num_workers)]

    def _start(self):
        registered = {k: v for k, v in REWARDS.items() if not isinstance(v, str)}
        return RewardActor.options(num_cpus=self.num_cpus).remote(self.spec, self._model_path, registered)

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        n = len(self.actors)
        shards = [samples[i::n] for i in range(n)]
        refs = [a.score.remote(shard) if shard else None for a, shard in zip(self.actors, shards)]
        limit = self.batch_timeout_s or self.spec.timeout_s * (len(samples) + 1) * len(self.spec.weights)
        ready, _ = ray.wait([r for r in refs if r is not None], num_returns=sum(r is not None for r in refs),
                            timeout=limit)
        ready = set(ready)
        shard_results: list[list[RewardResult]] = []
        for i, (ref, shard) in enumerate(zip(refs, shards)):
            if ref is None:
                shard_results.append([])
                continue
            reason = None
            if ref not in ready:
                reason = f"reward worker took longer than {limit:g}s"
            else:
                try:
                    shard_results.append(ray.get(ref))
                    continue
                except Exception as e:  # actor died or raised outside the per-reward guard
                    never_started(e)
                    reason = f"reward worker failed: {type(e).__name__}: {e}"[:300]
            log.warning("%s; scoring its %d samples 0 and restarting it", reason, len(shard))
            ray.kill(self.actors[i], no_restart=True)
            self.actors[i] = self._start()
            shard_results.append([RewardResult(0.0, reason, {"failed": True}) for _ in shard])
        out: list[RewardResult | None] = [None] * len(samples)
        for i, results in enumerate(shard_results):
            out[i::n] = results
        return out  # type: ignore[return-value]

    def metrics(self, results: Sequence[RewardResult]) -> dict[str, float]:
        return reward_metrics(list(self.spec.weights), results)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
