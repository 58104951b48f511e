"""Rewards combine by name and weight; a crashing, NaN or slow reward costs only its own samples."""

import sys
import time

import pytest
from pydantic import ValidationError

from rewards.base import REWARDS, RewardResult, make_reward
from rewards.combine import CombinedReward, RewardSpec, reward_failed


class Crashes:
    """Raises on any sample whose completion says 'crash'."""

    name = "crashes"

    def __call__(self, samples):
        if any("crash" in s["completion"] for s in samples):
            raise RuntimeError("boom")
        return [RewardResult(1.0) for _ in samples]


class ReturnsNaN:
    name = "nan"

    def __call__(self, samples):
        return [RewardResult(float("nan") if "nan" in s["completion"] else 1.0) for s in samples]


class Slow:
    name = "slow"

    def __call__(self, samples):
        if any("slow" in s["completion"] for s in samples):
            time.sleep(30)
        return [RewardResult(1.0) for _ in samples]


class Dies:
    """Kills its whole process: only a worker in another process survives this."""

    name = "dies"

    def __call__(self, samples):
        if any("die" in s["completion"] for s in samples):
            import os

            os._exit(1)
        return [RewardResult(1.0) for _ in samples]


@pytest.fixture
def flaky(monkeypatch):
    for cls in (Crashes, ReturnsNaN, Slow, Dies):
        monkeypatch.setitem(REWARDS, cls.name, cls)


def batch(*completions):
    return [{"id": i, "completion": c, "answer": "2"} for i, c in enumerate(completions)]


def test_yaml_names_rewards_and_bad_names_fail_clearly():
    spec = RewardSpec.model_validate({"weights": {"math": 1.0, "format": 0.1}, "options": {"math": {"timeout_s": 2}}})
    assert list(CombinedReward(spec).rewards) == ["math", "format"]
    with pytest.raises(ValidationError, match=r"unknown reward 'maths'; known rewards: .*math"):
        RewardSpec(weights={"maths": 1.0})
    with pytest.raises(ValidationError, match=r"math: unknown option 'timeout'; math takes timeout_s"):
        RewardSpec(weights={"math": 1.0}, options={"math": {"timeout": 2}})
    with pytest.raises(ValidationError, match="extra"):
        RewardSpec(weights={"math": 1.0}, weight={"math": 1.0})
    with pytest.raises(ValidationError, match="needs `reward_model:`"):
        RewardSpec(weights={"reward_model": 1.0})


def test_combined_score_keeps_components_and_metrics_are_named_per_reward():
    reward = CombinedReward(RewardSpec(weights={"math": 1.0, "format": 0.5}))
    results = reward(batch("<think>1+1</think>\nAnswer: 2", "<think>unsure", "Answer: 3"))
    assert [r.score for r in results] == [1.5, 0.0, 0.5]
    assert [(r.details["math"], r.details["format"]) for r in results] == [(1.0, 1.0), (0.0, 0.0), (0.0, 1.0)]
    assert results[2].details["reasons"] == {"math": "wrong answer"}
    m = reward.metrics(results)
    assert m["reward/math"] == pytest.approx(1 / 3) and m["reward/format"] == pytest.approx(2 / 3)
    assert m["reward/weighted_sum"] == pytest.approx(2 / 3) and m["reward/math/failed"] == 0.0


def test_crashing_nan_and_slow_rewards_do_not_kill_the_batch(flaky):
    spec = RewardSpec(weights={"math": 1.0, "crashes": 1.0, "nan": 1.0, "slow": 1.0}, timeout_s=0.3)
    t0 = time.perf_counter()
    results = CombinedReward(spec)(batch("Answer: 2", "Answer: 2\ncrash", "Answer: 2\nnan", "Answer: 2\nslow"))
    assert time.perf_counter() - t0 < 5
    assert [r.score for r in results] == [4.0, 3.0, 3.0, 3.0]
    assert "RuntimeError: boom" in results[1].details["reasons"]["crashes"]
    assert "returned nan" in results[2].details["reasons"]["nan"]
    assert "longer than 0.3s" in results[3].details["reasons"]["slow"]
    m = CombinedReward(spec).metrics(results)
    assert m["reward/crashes/failed"] == m["reward/nan/failed"] == m["reward/slow/failed"] == 0.25
    # each made-up score says so (GRPO leaves those samples out); the earned one does not
    assert [reward_failed(r) for r in results] == [False, True, True, True]


def test_registered_reward_is_built_by_name(flaky):
    assert make_reward("crashes").name == "crashes"


def test_ray_workers_survive_a_reward_that_kills_its_process(flaky, ray_session):
    from ray import cloudpickle  # the copy Ray pickles with; the standalone package is not a dependency

    from rewards.workers import RayRewardPool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ship this file's rewards to the actors
    try:
        pool = RayRewardPool(RewardSpec(weights={"math": 1.0, "dies": 1.0, "crashes": 1.0}), num_workers=2,
                             num_cpus=0.5, batch_timeout_s=60)
        results = pool(batch("Answer: 2", "Answer: 2\ncrash", "Answer: 2\ndie", "Answer: 3"))
        # shards are samples [0, 2] and [1, 3]: the first worker died, the second isolated the crash
        assert [r.score for r in results] == [0.0, 2.0, 0.0, 2.0]
        assert "reward worker failed" in results[0].reason and results[2].details["failed"]
        assert [reward_failed(r) for r in results] == [True, True, True, False]
        assert results[1].details["reasons"]["crashes"].startswith("crashes failed: RuntimeError")
        assert [r.score for r in pool(batch("Answer: 2", "Answer: 2"))] == [3.0, 3.0]  # replaced, healthy
        assert pool.metrics(results)["reward/dies/failed"] == 0.5
        pool.close()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_reward_scores_only_its_domains():
    """rewards.domains: a multi-domain stage scores each sample with its own domain's checker."""
    spec = RewardSpec(weights={"math": 1.0, "format": 0.5}, domains={"math": ["math"]})
    r = CombinedReward(spec)
    res = r([{"id": 0, "domain": "math", "completion": "<think>x</think>\nAnswer: 2", "answer": "2"},
             {"id": 1, "domain": "code", "completion": "<think>x</think>\nAnswer: 2", "answer": "3"}])
    assert (res[0].score, res[1].score) == (1.5, 0.5)
    assert "math" in res[0].details and "math" not in res[1].details
    m = r.metrics(res)
    assert m["reward/math"] == 1.0 and m["reward/format"] == 1.0, "means over the samples each reward scores"
    with pytest.raises(ValueError, match="'code' has domains but no weight"):
        RewardSpec(weights={"math": 1.0}, domains={"code": ["code"]})
