"""A reward model trained on IF checker pairs ranks held-out pairs well, and serves as a reward by name."""

import json

import pytest
import torch

from pipeline.context import StageContext
from pipeline.stages import stage_module
from rewards.combine import CombinedReward, RewardSpec
from rewards.if_data import preference_pairs
from rewards.reward_model import Config, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
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
