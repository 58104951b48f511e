"""A reward model trained on IF checker pairs ranks held-out pairs well, serves as a reward by name, and
trains on a 2-worker learner group."""

import json
import math

import pytest
import torch

from pipeline.context import StageContext
from pipeline.stages import stage_module
from rewards.combine import CombinedReward, RewardSpec
from rewards.if_data import preference_pairs
from experts.reward_model import Config, run
from learner.config import LearnerConfig
from transformers import AutoModelForSequenceClassification


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    # One thread: on a busy 2-core machine torch's second thread spins and makes this ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("rm")
    cfg = Config(n_pairs=300, steps=60, batch_size=8, max_length=128, eval_every=30)
    run(cfg, StageContext("test", "rm", out, {}, seed=0))
    yield out
    torch.set_num_threads(threads)


def test_stage_is_registered_and_its_defaults_validate():
    assert stage_module("reward_model").Config() == Config()


def test_the_score_head_on_a_language_model_is_seeded(tmp_path):
    from experts.models import build_tiny_model, save_checkpoint, train_tokenizer
    from experts.reward_model import _setup

    tok = train_tokenizer(["count the lines", "write the answer"] * 50, vocab_size=300)
    save_checkpoint(build_tiny_model(tok, num_hidden_layers=1, hidden_size=32, intermediate_size=64), tok, tmp_path / "lm")
    ctx = lambda seed: StageContext("test", "rm", tmp_path / "rm", {}, seed=seed)
    heads = [_setup(Config(model=str(tmp_path / "lm")), ctx(seed), [])[0].score.weight for seed in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1])  # a rerun starts from the same reward model
    assert not torch.equal(heads[0], heads[2])


def test_held_out_pairs_are_ranked_far_better_than_chance(trained):
    report = json.loads((trained / "eval.json").read_text())
    assert report["n_eval"] == 60
    assert report["pairwise_accuracy"] >= 0.7, report
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 60 and metrics[-1]["loss"] < metrics[0]["loss"]
    assert [m["step"] for m in metrics if "eval/pairwise_accuracy" in m] == [30, 60]


def test_checkpoint_is_a_plain_hf_model_with_tokenizer(trained):
    files = {p.name for p in (trained / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files


def test_trained_model_serves_as_the_reward_model_reward(trained):
    spec = RewardSpec(weights={"reward_model": 1.0}, reward_model=str(trained / "model"))
    reward = CombinedReward(spec)
    pairs = preference_pairs(40, seed=123)  # unseen seed
    as_sample = lambda p, k: {"messages": p["messages"], "completion": f"<think>ok</think>\n{p[k]}"}
    chosen = reward([as_sample(p, "chosen") for p in pairs])
    rejected = reward([as_sample(p, "rejected") for p in pairs])
    wins = sum(c.score > r.score for c, r in zip(chosen, rejected))
    assert wins >= 28, wins
    assert reward.metrics(chosen)["reward/reward_model"] > reward.metrics(rejected)["reward/reward_model"]


def test_sigmoid_bounds_the_score_and_keeps_its_order(trained):
    path = str(trained / "model")
    pairs = preference_pairs(8, seed=7)
    samples = [{"messages": p["messages"], "completion": p[k]} for p in pairs for k in ("chosen", "rejected")]
    raw = [r.score for r in CombinedReward(RewardSpec(weights={"reward_model": 1.0}, reward_model=path))(samples)]
    bounded = [r.score for r in CombinedReward(RewardSpec(weights={"reward_model": 1.0}, reward_model=path,
                                                          options={"reward_model": {"sigmoid": True}}))(samples)]
    assert bounded == pytest.approx([1 / (1 + math.exp(-x)) for x in raw], abs=1e-6)
    assert all(0 < b < 1 for b in bounded)


def test_two_workers_train_the_reward_model(tmp_path, ray_session):
    cfg = Config(n_pairs=40, steps=4, batch_size=4, max_length=64, eval_every=2, save_every=2,
                 learner=LearnerConfig(workers=2, cpus_per_worker=0.5))
    run(cfg, StageContext("test", "rm2", tmp_path, {}, seed=0))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(m["grad_norm"] > 0 for m in metrics)
    assert (tmp_path / "checkpoints" / "step_4" / "COMPLETE").exists()
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert model.config.num_labels == 1
