"""Weighted sum of named rewards, as a GRPO stage's config names them, with failures isolated.

In a stage's YAML:

    rewards:
      weights: {math: 1.0, format: 0.1}     # reward name -> weight
      options: {math: {timeout_s: 2}}       # keyword options for a reward's constructor
      timeout_s: 10                         # per-sample time limit

A name is a built-in reward (`rewards.base.REWARDS`) or a user's own as `module:attribute`: a
class (built with its options, then called with the batch) or a function `fn(samples, **options)`.
`RewardSpec` validates that (unknown names, import paths that do not import, objects without the
reward signature, unknown or missing options all fail at load time, naming the bad one);
`CombinedReward(spec)` scores a batch: each sample's score is sum(weight * component score), and
`details` keeps every component's score and reason. A component that raises, runs past its time
limit or returns NaN scores the affected samples 0.0 with the reason logged and `failed` in its
details (`reward_failed`); the batch goes on, and GRPO leaves such samples out instead of training
on a 0 that the response did not earn.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pipeline.config import ModelRef
from rewards.base import (REWARDS, Reward, RewardResult, Sample, accepts, check_options, clean_score, deadline,
                          load_custom_reward, reward_factory)

log = logging.getLogger(__name__)

NOT_APPLICABLE = "not_applicable"  # details key of a sample a reward returned None for


class RewardSpec(BaseModel):
    """Which rewards score a GRPO stage's rollouts, with what weights and limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: dict[str, float] = Field(
        default_factory=lambda: {"math": 1.0, "format": 0.1},
        description="Reward name (see rewards.base.REWARDS), or your own reward's `module:attribute`, "
        "-> weight in the summed score.",
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-reward keyword options for its constructor, e.g. {code: {mode: fraction}}.",
    )
    timeout_s: float = Field(
        10.0, gt=0, description="Per-sample time limit; a sample past it scores 0 for that reward."
    )
    reward_model: ModelRef | None = Field(
        None, description="Checkpoint for the `reward_model` reward: a reward_model stage or an HF dir."
    )
    domains: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Reward name -> the sample domains it scores, e.g. {math: [math], code: [code]} for a "
        "multi-domain stage; it adds nothing to other domains' samples. A reward not named scores every sample.",
    )

    @field_validator("weights")
    @classmethod
    def _names_exist(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("name at least one reward")
        for name in weights:
            if name in REWARDS:
                continue
            if ":" not in name:
                raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}, "
                                 "or your own as `module:attribute`")
            load_custom_reward(name)  # imports it now: a bad path fails at load time, not on the first batch
        return weights

    @field_validator("options")
    @classmethod
    def _options_fit(cls, options: dict[str, dict[str, Any]], info: ValidationInfo) -> dict[str, dict[str, Any]]:
        weights = info.data.get("weights") or {}
        for name, opts in options.items():
            if name not in weights:
                raise ValueError(f"{name!r} has options but no weight; weighted rewards: {', '.join(weights)}")
            check_options(name, reward_factory(name), opts, require=name not in REWARDS)
        return options

    @model_validator(mode="after")
    def _custom_options_complete(self) -> "RewardSpec":
        for name in self.weights:
            if name not in REWARDS and name not in self.options:
                check_options(name, reward_factory(name), {})
        return self

    @field_validator("domains")
    @classmethod
    def _domains_weighted(cls, domains: dict[str, list[str]], info: ValidationInfo) -> dict[str, list[str]]:
        weights = info.data.get("weights") or {}
        for name in domains:
            if name not in weights:
                raise ValueError(f"{name!r} has domains but no weight; weighted rewards: {', '.join(weights)}")
        return domains

    def scores(self, name: str, domain: str | None) -> bool:
        """Whether reward `name` applies to a sample of `domain`."""
        return name not in self.domains or domain in self.domains[name]

    @model_validator(mode="after")
    def _has_checkpoint(self) -> "RewardSpec":
        if "reward_model" in self.weights and self.reward_model is None:
            raise ValueError("the `reward_model` reward needs `reward_model:` (a stage name or a checkpoint dir)")
        return self


def score_guarded(reward: Reward, samples: Sequence[Sample], timeout_s: float | None) -> list[RewardResult]:
    """`reward(samples)`, but a raise, a NaN or a timeout costs only the samples it touches.

    A plain number in the results is taken as the score, and None as "does not apply" (TRL's
    conventions), so a user's reward may return either instead of a `RewardResult`.

    The batch runs first under a limit of `timeout_s` per sample; if it raises or runs out of
    time, each sample is scored alone under `timeout_s`, so one bad sample scores 0.0 (with the
    reason) and the rest keep their scores.
    """
    name = getattr(reward, "name", type(reward).__name__)
    samples = list(samples)
    try:
        with deadline(timeout_s * len(samples) if timeout_s else None):
            results = reward(samples)
        if len(results) != len(samples):
            raise ValueError(f"returned {len(results)} results for {len(samples)} samples")
    except Exception as e:
        if len(samples) == 1:
            log.warning("reward %s failed on sample %s: %s: %s", name, samples[0].get("id"), type(e).__name__, e)
            return [RewardResult(0.0, f"{name} failed: {type(e).__name__}: {e}"[:300], {"failed": True})]
        log.warning("reward %s failed on a batch of %d (%s: %s); scoring one at a time", name, len(samples),
                    type(e).__name__, e)
        return [score_guarded(reward, [s], timeout_s)[0] for s in samples]
    out = []
    for s, r in zip(samples, results):
        if r is None:  # TRL's convention for "this reward does not apply to this sample"
            out.append(RewardResult(0.0, None, {NOT_APPLICABLE: True}))
            continue
        if not isinstance(r, RewardResult):
            r = RewardResult(r)  # a plain number, as TRL's reward functions return
        score, problem = clean_score(r.score)
        if problem:
            log.warning("reward %s on sample %s: %s", name, s.get("id"), problem)
            r = RewardResult(0.0, f"{name}: {problem}", {**r.details, "failed": True})
        else:
            r.score = score
        out.append(r)
    return out


class CombinedReward:
    """The weighted sum of `spec.weights`' rewards; a plain class (see `rewards.workers` for Ray).

    >>> r = CombinedReward(RewardSpec(weights={"math": 1.0, "format": 0.5}))
    >>> res = r([{"id": 0, "completion": "<think>1+1</think>\\nAnswer: 2", "answer": "2"}])[0]
    >>> res.score, res.details["math"], res.details["format"]
    (1.5, 1.0, 1.0)
    """

    name = "combined"

    def __init__(self, spec: RewardSpec, model_path: Callable[[str], Path] = Path):
        self.spec = spec
        self.rewards: dict[str, Reward] = {}
        for name in spec.weights:
            factory = reward_factory(name)
            opts = dict(spec.options.get(name, {}))
            if accepts(factory, "timeout_s"):
                opts.setdefault("timeout_s", spec.timeout_s)
            if name == "reward_model":
                opts.setdefault("path", str(model_path(spec.reward_model)))
            reward = factory(**opts)
            if not getattr(reward, "name", None):
                reward.name = name
            self.rewards[name] = reward

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        samples = list(samples)
        totals = [0.0] * len(samples)
        details: list[dict[str, Any]] = [{} for _ in samples]
        reasons: list[dict[str, str]] = [{} for _ in samples]
        for name, reward in self.rewards.items():
            weight = self.spec.weights[name]
            mine = [i for i, s in enumerate(samples) if self.spec.scores(name, s.get("domain"))]
            if not mine:
                continue
            scored = score_guarded(reward, [samples[i] for i in mine], self.spec.timeout_s)
            for i, r in zip(mine, scored):
                if r.details.get(NOT_APPLICABLE):
                    continue  # as if outside the reward's `domains`: no score, not in its metric
                totals[i] += weight * r.score
                details[i][name] = r.score
                if r.details:
                    details[i][f"{name}/details"] = r.details
                if r.reason:
                    reasons[i][name] = r.reason
        return [
            RewardResult(t, "; ".join(f"{k}: {v}" for k, v in rs.items()) or None, {**d, "reasons": rs})
            for t, d, rs in zip(totals, details, reasons)
        ]

    def metrics(self, results: Sequence[RewardResult]) -> dict[str, float]:
        return reward_metrics(list(self.rewards), results)


def reward_failed(result: RewardResult) -> bool:
    """Whether a sample's score is made up because scoring failed (a component raised, timed out or
    returned NaN, or a reward worker died), rather than earned by the response.

    >>> reward_failed(RewardResult(0.0, "math failed: boom", {"math": 0.0, "math/details": {"failed": True}}))
    True
    >>> reward_failed(RewardResult(0.0, "reward worker failed", {"failed": True}))
    True
    >>> reward_failed(RewardResult(0.0, "no answer", {"math": 0.0}))
    False
    """
    d = result.details
    return bool(d.get("failed")) or any(
        k.endswith("/details") and isinstance(v, dict) and bool(v.get("failed")) for k, v in d.items())


def reward_metrics(names: Sequence[str], results: Sequence[RewardResult]) -> dict[str, float]:
    """Batch means named per reward (over the samples it scores): `reward/<name>`, `reward/<name>/failed`,
    `reward/weighted_sum` (over all).

    >>> reward_metrics(["math"], [RewardResult(1.0, None, {"math": 1.0}), RewardResult(0.0, None, {"math": 0.0})])
    {'reward/weighted_sum': 0.5, 'reward/math': 0.5, 'reward/math/failed': 0.0}
    """
    out = {"reward/weighted_sum": sum(r.score for r in results) / max(len(results), 1)}
    for name in names:
        mine = [r for r in results if name in r.details or r.details.get("failed")]  # the samples it scores
        n = max(len(mine), 1)
        out[f"reward/{name}"] = sum(r.details.get(name, 0.0) for r in mine) / n
        out[f"reward/{name}/failed"] = sum(
            bool(r.details.get("failed") or r.details.get(f"{name}/details", {}).get("failed")) for r in mine
        ) / n
    return {k: (0.0 if math.isnan(v) else v) for k, v in out.items()}
