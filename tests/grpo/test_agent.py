"""Agent rollouts run multi-turn episodes in real sandbox sessions; the task's check decides the reward."""

from __future__ import annotations

import re

import json

import pytest

from experts.data import DataConfig, load_samples, sample_texts
from experts.grpo import Config, run
from experts.models import build_tiny_model, save_checkpoint, train_tokenizer
from pipeline.context import StageContext
from rewards import RewardSpec
from rollout.config import AgentConfig, RolloutConfig
from rollout.episodes import run_episodes
from rollout.types import Completion
from sandbox import toolcall
from tests.conftest import TINY, quick_sft, sandbox_image_ok


pytestmark = pytest.mark.skipif(not sandbox_image_ok(), reason="needs Docker and the sandbox image (python -m sandbox build-image)")

SYSTEM = "Use tools."


class ScriptedBackend:
    """Replays assistant turns by how many tool results the context already holds."""

    def __init__(self, tokenizer, turns: list[str]):
        self.tok, self.turns = tokenizer, turns
        self.result_id = tokenizer.convert_tokens_to_ids(toolcall.RESULT_OPEN)
        self.contexts: list[list[int]] = []

    def complete(self, prompts, max_new_tokens, stop_ids):
        out = []
        for p in prompts:
            self.contexts.append(p)
            text = self.turns[min(p.count(self.result_id), len(self.turns) - 1)]
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            out.append(Completion(ids, [-0.5] * len(ids), True))
        return out


@pytest.fixture(scope="module")
def agent_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("agent")
    data = DataConfig(domain="agent", source="generator", task="experts.tasks:agent_samples", size=200, heldout=8,
                      task_args={"system": SYSTEM})
    tok = train_tokenizer(sample_texts(load_samples(data, "all")), vocab_size=400)
    save_checkpoint(build_tiny_model(tok, **TINY), tok, root / "base")
    return data, tok, root


@pytest.fixture(scope="module")
def pool():
    from sandbox import SandboxPool

    with SandboxPool(size=2) as p:
        yield p


def test_scripted_episode_in_a_real_sandbox_masks_tool_results(agent_data, pool):
    data, tok, _ = agent_data
    sample = next(s for s in load_samples(data) if "Count the lines" in s["messages"][-1]["content"])
    name = re.search(r"lines of (\S+) and", sample["messages"][-1]["content"]).group(1)
    turns = ["<think>\nI count with wc.\n</think>\n" + toolcall.format_call("bash", command=f"wc -l < {name} > answer.txt"),
             "<think>\nDone.\n</think>\nanswer.txt holds the count."]
    backend = ScriptedBackend(tok, turns)
    cfg = RolloutConfig(group_size=2, max_new_tokens=64, reasoning="think_high", think_budget=64)
    rollouts = run_episodes(backend, tok, [sample], 0, cfg, AgentConfig(max_turns=3), pool)
    assert len(rollouts) == 2
    r = rollouts[0]
    assert r.episode["reward"] == 1.0 and r.episode["check"]["ok"] and r.turns == 2 and r.finished
    # Tool-result tokens (and the markup around them) are masked; everything the model wrote is not.
    masked = tok.decode([t for t, m in zip(r.response_ids, r.loss_mask) if m == 0])
    trained = tok.decode([t for t, m in zip(r.response_ids, r.loss_mask) if m == 1])
    assert "<|tool_result|>" in masked and "<|im_start|>tool" in masked
    assert "<|tool_result|>" not in trained and "I count with wc." in trained and "answer.txt holds" in trained
    assert all(lp == 0.0 for lp, m in zip(r.logprobs, r.loss_mask) if m == 0)
    # Reasoning is kept across turns: the second turn's context holds the first turn's think block.
    assert "I count with wc." in tok.decode(backend.contexts[-1])
    # And the rewards see the episode the way rewards.agent expects.
    assert r.reward_sample()["meta"]["episode"]["reward"] == 1.0


def test_a_failed_check_scores_zero(agent_data, pool):
    data, tok, _ = agent_data
    sample = next(s for s in load_samples(data) if "Write" in s["messages"][-1]["content"])
    backend = ScriptedBackend(tok, ["I give up."])
    rollouts = run_episodes(backend, tok, [sample], 0, RolloutConfig(group_size=2, reasoning="non_think"), AgentConfig(), pool)
    assert [r.episode["reward"] for r in rollouts] == [0.0, 0.0] and all(r.turns == 1 for r in rollouts)


def test_agent_expert_trains_on_check_scripts(agent_data, ray_session, tmp_path):
    """SFT on scripted first turns, then a short GRPO run whose rewards come from check scripts."""
    data, tok, root = agent_data
    quick_sft(root / "base", data, root / "sft", steps=120, max_len=256)

    cfg = Config(model=str(root / "sft"), data=data, steps=2, prompts_per_step=2, lr=1e-4, kl_coef=0.01,
                 rewards=RewardSpec(weights={"agent": 1.0, "format": 0.1}), reward_workers=0,
                 rollout=RolloutConfig(group_size=4, max_new_tokens=48, reasoning="non_think"),
                 agent=AgentConfig(max_turns=2, max_total_tokens=160, sandboxes=4))
    run(cfg, StageContext("test", "grpo_agent", tmp_path, seed=0))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print("agent GRPO:", [{k: round(m.get(k, float("nan")), 3) for k in ("reward/agent", "reward/format", "agent/turns_mean", "kl")} for m in lines])
    assert len(lines) == 2 and all("reward/agent" in m and m["agent/turns_mean"] >= 1 for m in lines)
    assert (tmp_path / "model" / "config.json").exists()


def test_agent_episodes_run_multi_turn_on_vllm(agent_data, ray_session, tmp_path):
    """The same agent GRPO stage with vLLM as the rollout engine: multi-turn sandbox episodes, synced weights."""
    from tests.conftest import needs_vllm

    needs_vllm()
    from experts.models import load_tokenizer
    from pipeline.config import StageFailed

    data, tok, root = agent_data
    rollout = RolloutConfig(backend="vllm", group_size=4, max_new_tokens=48, reasoning="non_think")
    cfg = Config(model=str(root / "base"), data=data, steps=1, rollout=rollout)
    with pytest.raises(StageFailed, match="head_dim is 16"):  # TINY's heads are too small for vLLM's CPU kernels
        run(cfg, StageContext("test", "grpo_agent_hd16", tmp_path / "hd16", seed=0))
    # the same tokenizer and data on a model with head_dim 32
    base = save_checkpoint(build_tiny_model(load_tokenizer(root / "base"), **{**TINY, "num_attention_heads": 2,
                                                                          "num_key_value_heads": 1}), tok, root / "base32")
    quick_sft(base, data, root / "sft32", steps=120, max_len=256)
    cfg = Config(model=str(root / "sft32"), data=data, steps=2, prompts_per_step=2, lr=1e-4,
                 rewards=RewardSpec(weights={"agent": 1.0, "format": 0.1}), reward_workers=0, dynamic_sampling=False,
                 overlong="none",  # train on every episode, cut or not: the gap is measured on all of them
                 rollout=rollout, agent=AgentConfig(max_turns=2, max_total_tokens=160, sandboxes=4))
    run(cfg, StageContext("test", "grpo_agent_vllm", tmp_path, seed=0))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print("agent GRPO on vLLM:", [{k: round(m.get(k, float("nan")), 4) for k in
                                    ("reward/agent", "agent/turns_mean", "sync/probe_logp_gap", "logp_gap/max")} for m in lines])
    assert len(lines) == 2
    assert max(m["agent/turns_mean"] for m in lines) > 1, "episodes went past the first turn"
    assert all(m["sync/probe_logp_gap"] < 1e-3 and m["logp_gap/rollout_vs_learner"] < 1e-3 for m in lines)


def test_eval_scores_agent_tasks_by_greedy_episodes(agent_data):
    from experts.eval import Config as EvalConfig, score_model

    data, _, root = agent_data
    samples = load_samples(data, "heldout")[:3]
    cfg = EvalConfig(models=[str(root / "base")], data=[data], max_new_tokens=16, enable_thinking=False,
                     agent=AgentConfig(max_turns=2, max_total_tokens=64, sandboxes=2))
    result = score_model(str(root / "base"), samples, cfg)
    assert result["n"] == 3 and 0.0 <= result["score"] <= 1.0
    assert result["examples"][0]["completion"][0]["role"] == "assistant"  # the episode's turns, as messages


def test_a_rollout_that_games_the_check_scores_zero(agent_data, pool):
    """Rollouts score with the same hardened check as `sandbox.episode` (`run_check`): a background
    process that keeps rewriting fix_bug's test is killed and the test is written fresh."""
    from pathlib import Path

    from sandbox.episode import load_task

    _, tok, _ = agent_data
    task = load_task(Path(__file__).resolve().parents[2] / "sandbox" / "tasks" / "fix_bug.yaml")
    sample = {"id": "fix-bug", "domain": "agent", "answer": None, "meta": {"task": task.model_dump()},
              "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.prompt}]}
    cheat = toolcall.format_call("bash", command="setsid bash -c 'while :; do echo \"print(1)\" > test_stats.py; "
                                                 "sleep 0.01; done' </dev/null >/dev/null 2>&1 & "
                                                 "until grep -qx 'print(1)' test_stats.py; do sleep 0.01; done")
    backend = ScriptedBackend(tok, [cheat, "Done."])
    rollouts = run_episodes(backend, tok, [sample], 0, RolloutConfig(group_size=2, reasoning="non_think"),
                            AgentConfig(max_turns=2, max_total_tokens=4096), pool)
    for r in rollouts:
        assert r.turns == 2 and r.episode["reward"] == 0.0, r.episode["check"]
        assert "AssertionError" in r.episode["check"]["stderr"]  # the real test ran on the unfixed stats.py
