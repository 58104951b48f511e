"""GRPO raises the held-out reward of an under-trained SFT model, through the real stage on Ray."""

from __future__ import annotations

import json
import time

import pytest

from experts.data import DataConfig, load_samples, sample_texts
from experts.grpo import Config, GRPOLearner, collate_rollouts, run
from experts.models import build_tiny_model, save_checkpoint, train_tokenizer
from pipeline.config import StageFailed
from pipeline.context import StageContext
from rewards import CombinedReward, RewardSpec
from rollout.config import RolloutConfig
from rollout.sync import learner_logprobs, probe_gap, sync_weights
from rollout.worker import RolloutWorker
from tests.conftest import TINY, quick_sft


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    """Copy-the-digits data, a tiny base on its tokenizer, and an SFT model that is right ~half the time."""
    root = tmp_path_factory.mktemp("echo")
    data = DataConfig(domain="math", source="generator", task="experts.tasks:echo_samples", size=600, heldout=64)
    tok = train_tokenizer(sample_texts(load_samples(data, "all")), vocab_size=300)
    save_checkpoint(build_tiny_model(tok, **TINY), tok, root / "base")
    return data, quick_sft(root / "base", data, root / "sft", steps=500, max_len=64), root


def heldout_reward(model_path, data, rollout: RolloutConfig) -> float:
    """Mean reward of G sampled responses per held-out prompt, at the training temperature."""
    worker = RolloutWorker(str(model_path), rollout, seed=123)
    rollouts = worker.generate(load_samples(data, "heldout"), step=999)
    results = CombinedReward(RewardSpec(weights={"math": 1.0}))([r.reward_sample() for r in rollouts])
    return sum(r.score for r in results) / len(results)


def test_grpo_raises_heldout_reward(echo, ray_session, tmp_path):
    data, sft, _ = echo
    cfg = Config(model=str(sft), data=data, rewards=RewardSpec(weights={"math": 1.0}), steps=40, prompts_per_step=16,
                 lr=5e-4, micro_batch_size=128, mini_batches=1, overlong="none", save_every=20, reward_workers=1,
                 rollout=RolloutConfig(group_size=8, max_new_tokens=16))
    before = heldout_reward(sft, data, cfg.rollout)
    ctx = StageContext("test", "grpo", tmp_path, seed=0)
    t0 = time.time()
    run(cfg, ctx)
    after = heldout_reward(tmp_path / "model", data, cfg.rollout)
    print(f"held-out mean reward: SFT {before:.3f} -> GRPO {after:.3f} ({time.time() - t0:.0f}s for {cfg.steps} steps)")
    assert 0.1 < before < 0.9  # neither hopeless nor saturated, so there is something to learn
    assert after >= before + 0.07
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 41))
    for key in ("reward/mean", "reward/std", "reward/math", "pass_rate/math", "kl", "entropy", "clip_frac",
                "response/length_mean", "groups/zero_variance_dropped", "groups/informative", "refill/generate_calls",
                "refill/groups_drawn", "rollouts/reward_failed", "logp_gap/rollout_vs_learner",
                "sync/probe_logp_gap", "time/generate", "time/score", "time/train"):
        assert key in lines[-1], key
    # dynamic sampling refilled the steps that came up short, and never trained more than 16 groups
    assert sum(m["refill/generate_calls"] for m in lines) > 0 and max(m["groups/informative"] for m in lines) <= 16
    assert lines[-1]["logp_gap/rollout_vs_learner"] < 1e-4  # HF rollout and learner agree (fp32)
    assert (tmp_path / "checkpoints" / "step_40" / "COMPLETE").exists()


def test_fresh_prompts_refills_and_retired_prompts_on_the_real_stage(echo, ray_session, tmp_path):
    """New echo problems every step, refills of tied groups, retiring with its history beside each checkpoint,
    and the k3 estimator in the loss, through the real stage."""
    data, sft, _ = echo
    cfg = Config(model=str(sft), data=data, rewards=RewardSpec(weights={"math": 1.0}), steps=4, prompts_per_step=8,
                 lr=5e-4, micro_batch_size=64, overlong="none", save_every=2, reward_workers=0, kl_coef=0.01,
                 kl_estimator="k3", fresh_prompts=True, skip_uninformative_after=1, max_refill_calls=2,
                 rollout=RolloutConfig(group_size=4, max_new_tokens=16))
    run(cfg, StageContext("test", "grpo", tmp_path, seed=0))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print("fresh prompts:", [{k: m[k] for k in ("groups/total", "groups/informative", "refill/generate_calls",
                                                  "prompts/retired", "kl")} for m in lines])
    assert len(lines) == 4 and all(m["groups/informative"] <= 8 and m["kl"] >= 0 for m in lines)
    assert sum(m["refill/generate_calls"] for m in lines) > 0
    assert lines[-1]["prompts/retired"] >= 1  # an echo of SFT quality solves some groups outright
    ckpts = tmp_path / "checkpoints"
    assert sorted(f.name for f in ckpts.glob("prompt_history_*")) == ["prompt_history_step_2.json",
                                                                      "prompt_history_step_4.json"]


def test_stale_rollout_weights_are_caught(echo, monkeypatch):
    """After an update the un-synced rollout worker's probe log-probs no longer match the learner's;
    a sync brings them back, and a sync that does not take fails the stage."""
    data, sft, _ = echo
    cfg = Config(model=str(sft), data=data, lr=1e-3, rollout=RolloutConfig(group_size=4, max_new_tokens=12))
    learner, worker = GRPOLearner(str(sft), cfg, local=True), RolloutWorker(str(sft), cfg.rollout)
    probe = [worker.tokenizer("Repeat the digits 1 2 3.")["input_ids"]]
    tol = worker.sync_tolerance()

    def gap():
        return probe_gap(learner_logprobs(learner.group, probe), worker.prompt_logprobs(probe))

    assert gap() < tol
    rollouts = worker.generate(load_samples(data)[:2])
    adv = [1.0 if i % 2 else -1.0 for i in range(len(rollouts))]
    learner.train_step(collate_rollouts(rollouts, adv, worker.tokenizer.pad_token_id))
    assert gap() > tol
    m = sync_weights(learner.group, [worker], probe)
    assert gap() < tol and m["sync/probe_logp_gap"] < tol and m["sync/buckets"] >= 1
    learner.train_step(collate_rollouts(rollouts, adv, worker.tokenizer.pad_token_id))
    monkeypatch.setattr(worker.backend, "load_bucket", lambda weights: None)  # a sync that loses the weights
    with pytest.raises(StageFailed, match="rollout worker 0 has stale weights"):
        sync_weights(learner.group, [worker], probe)


def test_think_budget_forces_the_think_block_closed(echo):
    """think_high with a 1-token budget: the think block is closed for the model right after
    `<think>`, the forced `</think>` is masked out of the loss (the model did not sample it), and
    the model still answers after it."""
    data, sft, _ = echo
    cfg = RolloutConfig(group_size=4, max_new_tokens=16, reasoning="think_high", think_budget=1)
    worker = RolloutWorker(str(sft), cfg)
    rollouts = worker.generate(load_samples(data)[:2])
    tok = worker.tokenizer
    for r in rollouts:
        assert r.response_ids[0] == tok.convert_tokens_to_ids("<think>") and r.loss_mask[0] == 1
        assert r.response_ids[1] == tok.convert_tokens_to_ids("</think>") and r.loss_mask[1] == 0 and r.logprobs[1] == 0.0
        assert "boxed" in r.text and r.loss_mask[-1] == 1


def test_one_stage_trains_several_domains_each_scored_and_sampled_as_its_own(echo, ray_session, tmp_path):
    """A mixed model's GRPO (the quickstart's baseline): two domains, each its share of a step's prompts, its own
    generation budget and its own reward; a reward named for one domain adds nothing to the other's samples."""
    data, sft, _ = echo
    code = DataConfig(domain="code", source="generator", task="experts.tasks:code_samples", size=50, heldout=5)
    cfg = Config(model=str(sft), data=[data, code], mix={"math": 3, "code": 1}, steps=2, prompts_per_step=8,
                 rewards=RewardSpec(weights={"math": 1.0, "format": 0.1}, domains={"math": ["math"]}),
                 lr=5e-4, micro_batch_size=64, overlong="none", save_every=2, reward_workers=0, max_refill_calls=0,
                 rollout=RolloutConfig(group_size=4, max_new_tokens=16, reasoning="non_think",
                                       domains={"code": {"max_new_tokens": 2}}))
    run(cfg, StageContext("test", "mixed", tmp_path, seed=0))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:  # 6 math and 2 code prompts a step, 4 rollouts each, each domain within its own budget
        assert (m["domain/math/rollouts"], m["domain/code/rollouts"]) == (24, 8)
        assert m["domain/code/length_mean"] <= 2 < m["domain/math/length_mean"]
        assert m["domain/code/reward_mean"] <= 0.1 + 1e-6, "code samples get the format reward only"
    assert (tmp_path / "model" / "config.json").exists()
