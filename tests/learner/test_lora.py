"""LoRA through peft: only the adapters train, everything that leaves the learner is the merged plain model,
checkpoints resume the adapters and their optimizer state, and GRPO's reference is the base, adapters off."""

from __future__ import annotations

import functools
import json

import pytest
import ray
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from experts import grpo, sft
from experts.data import DataConfig, load_samples
from experts.grpo_loss import next_token_logprobs
from experts.models import load_model, load_tokenizer
from learner.config import LearnerConfig
from learner.group import WorkerGroup
from learner.lora import LoraConfig
from pipeline.config import UserError
from pipeline.context import StageContext
from rewards import RewardResult, RewardSpec
from rewards.base import register
from rollout.config import RolloutConfig
from rollout.sync import learner_logprobs, probe_gap, sync_weights
from rollout.worker import RolloutWorker
from tests.conftest import ARITH

LORA = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])


def sft_setup(base, n=12, **learner):
    tok = load_tokenizer(base)
    rows = sft.build_rows(tok, load_samples(DataConfig(**ARITH))[:n], 64, packing=False)
    cfg = sft.Config(model=str(base), batch_size=4, lr=1e-2, warmup_steps=0, learner=LearnerConfig(lora=LORA, **learner))
    return tok, rows, cfg


def params(group: WorkerGroup) -> dict[str, torch.Tensor]:
    return group.apply(lambda m: {k: v.detach().clone() for k, v in m.named_parameters()})[0]


def test_sft_with_lora_trains_only_the_adapters_and_saves_a_plain_merged_model(tiny_base, tmp_path):
    tok, rows, cfg = sft_setup(tiny_base)
    group = WorkerGroup(str(tiny_base), cfg.learner, sft.optim(cfg), local=True)
    before = params(group)
    adapters = {k for k in before if ".lora_" in k}
    assert adapters and all(".self_attn." in k for k in adapters)
    assert {id(p) for p in group.workers[0].opt.param_groups[0]["params"]} == group.apply(
        lambda m: {id(p) for k, p in m.named_parameters() if ".lora_" in k})[0], "the optimizer holds the adapters only"

    losses = [sft.train_step(group, rows, cfg, tok.pad_token_id)["loss"] for _ in range(8)]
    after = params(group)
    print("lora sft losses", [round(x, 3) for x in losses])
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(before[k], after[k]) for k in before if k not in adapters), "frozen weights stayed put"
    assert all(not torch.equal(before[k], after[k]) for k in adapters if ".lora_B." in k)

    out = group.save_hf(tmp_path / "model", str(tiny_base))
    with safe_open(out / "model.safetensors", "pt") as f:
        saved_names = set(f.keys())
    base_sd = load_model(tiny_base).state_dict()
    assert not any("lora" in k or "base_layer" in k for k in saved_names)
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert merged.keys() == base_sd.keys()
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base_sd["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base_sd["model.layers.0.mlp.up_proj.weight"])
    probe = [ids for ids, _ in rows[:4]]
    plain = [lp[: len(r) - 1].tolist() for lp, r in zip(next_token_logprobs(
        AutoModelForCausalLM.from_pretrained(out), sft.collate([(r, r) for r in probe], tok.pad_token_id)), probe)]
    assert probe_gap(learner_logprobs(group, probe), plain) < 1e-5, "the saved model computes what the learner did"


def test_a_lora_checkpoint_holds_the_adapters_and_resumes_the_same_run(tiny_base, tmp_path):
    import torch.distributed.checkpoint as dcp

    tok, rows, cfg = sft_setup(tiny_base)
    straight = WorkerGroup(str(tiny_base), cfg.learner, sft.optim(cfg), local=True)
    for _ in range(3):
        sft.train_step(straight, rows, cfg, tok.pad_token_id)
    ckpt = straight.save(tmp_path / "checkpoints", 3, keep=2)
    for _ in range(2):
        sft.train_step(straight, rows, cfg, tok.pad_token_id)

    saved = dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), "frozen base weights are not copied into checkpoints"
    assert any(k.startswith("optim.state.") for k in saved)

    resumed = WorkerGroup(str(tiny_base), cfg.learner, sft.optim(cfg), resume=str(ckpt), local=True)
    assert resumed.step == 3
    for _ in range(2):
        sft.train_step(resumed, rows, cfg, tok.pad_token_id)
    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-6  # Adam moments came back too


def test_lora_is_refused_by_a_stage_that_trains_its_model_whole(tiny_base):
    from experts.reward_model import load_scorer

    with pytest.raises(UserError, match=r"rm: learner.lora is for sft and grpo; this stage trains its whole model"):
        WorkerGroup(str(tiny_base), LearnerConfig(lora=LORA), None, loader=load_scorer, name="rm", local=True)
    with pytest.raises(UserError, match=r"learner.lora.target_modules \['qkv'\]"):
        WorkerGroup(str(tiny_base), LearnerConfig(lora=LoraConfig(target_modules=["qkv"])), None, local=True)


def test_grpo_with_lora_syncs_merged_weights_and_keeps_the_base_as_reference(tiny_base):
    cfg = grpo.Config(model=str(tiny_base), lr=1e-2, kl_coef=0.1, micro_batch_size=8,
                      learner=LearnerConfig(lora=LORA), rollout=RolloutConfig(group_size=4, max_new_tokens=8))
    assert grpo.reference_is_base(cfg) and grpo.resources(cfg)["CPU"] == grpo.resources(
        cfg.model_copy(update={"kl_coef": 0.0}))["CPU"], "no reference group is started"
    learner, worker = grpo.GRPOLearner(str(tiny_base), cfg, local=True), RolloutWorker(str(tiny_base), cfg.rollout)
    ref = grpo.BaseWeightsReference(learner)
    base = load_model(tiny_base)
    probe = [worker.tokenizer("1 + 2 =")["input_ids"]]
    samples = load_samples(DataConfig(**ARITH))[:2]
    kls = []
    for step in range(2):
        rollouts = worker.generate(samples, step=step)
        batch = grpo.collate_rollouts(rollouts, [1.0 if i % 2 else -1.0 for i in range(len(rollouts))],
                                      worker.tokenizer.pad_token_id)
        ref_logp = ref.logprobs(batch)
        with torch.no_grad():
            assert torch.allclose(ref_logp, next_token_logprobs(base, batch, temperature=cfg.rollout.temperature),
                                  atol=1e-5), "the reference is the base model"
        kls.append(learner.train_step(batch, ref_logp)["kl"])
        m = sync_weights(learner.group, [worker], probe)
        assert m["sync/probe_logp_gap"] < 1e-5
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls[1] > 0  # B starts at zero: policy = reference, then moves

    # What the rollout engine holds is peft's own merge of the learner's adapters, under the base names.
    lora_model = learner.group.workers[0].model
    assert all(p.requires_grad for k, p in lora_model.named_parameters() if ".lora_" in k), "adapters still train"
    rollout_sd = worker.backend.model.state_dict()
    assert rollout_sd.keys() == base.state_dict().keys()
    for name, module in lora_model.named_modules():
        if hasattr(module, "get_delta_weight"):
            want = module.base_layer.weight + module.get_delta_weight("default")
            assert torch.allclose(rollout_sd[f"{name}.weight"], want, atol=1e-6), name
            assert not torch.equal(rollout_sd[f"{name}.weight"], base.state_dict()[f"{name}.weight"]), name


@pytest.fixture
def ray_cluster(ray_session):
    if ray.cluster_resources().get("CPU", 0) < 2:
        pytest.skip("needs 2 CPUs in the embedded Ray")
    return ray_session


def digit_share(**_):
    """A reward that varies on a random model's text: the share of its characters that are digits."""
    return lambda samples: [RewardResult(sum(c.isdigit() for c in s["completion"]) / max(1, len(s["completion"])))
                            for s in samples]


def test_grpo_stage_with_lora_on_two_fsdp2_workers(ray_cluster, tiny_base, tmp_path):
    """The real stage: 2 FSDP2 ranks train adapters, the rollout actor gets merged weights every step
    (the probe proves they compute what the LoRA learner does), the KL is against the base, and
    `model/` is a plain checkpoint."""
    register("digit_share", digit_share)
    data = DataConfig(**ARITH)
    cfg = grpo.Config(model=str(tiny_base), data=data, rewards=RewardSpec(weights={"digit_share": 1.0}), steps=2,
                      prompts_per_step=4, lr=1e-2, kl_coef=0.1, dynamic_sampling=False, overlong="none",
                      save_every=1, reward_workers=0, micro_batch_size=8,
                      rollout=RolloutConfig(group_size=4, max_new_tokens=8, temperature=1.5),
                      learner=LearnerConfig(workers=2, cpus_per_worker=0.5, strategy="fsdp2", lora=LORA))
    grpo.run(cfg, StageContext("test", "grpo", tmp_path, seed=0))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print("lora grpo", [{k: m[k] for k in ("reward/mean", "kl", "loss", "sync/probe_logp_gap")} for m in lines])
    assert len(lines) == 2 and all(m["sync/probe_logp_gap"] < 1e-5 for m in lines)
    assert lines[1]["kl"] > 0
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    base = load_model(tiny_base).state_dict()
    assert final.keys() == base.keys()
    moved = functools.reduce(max, (float((final[k] - base[k]).abs().max()) for k in base))
    assert moved > 0 and torch.equal(final["model.norm.weight"], base["model.norm.weight"])
    assert (tmp_path / "checkpoints" / "step_2" / "COMPLETE").exists()


def test_merge_example_runs_as_written():
    import doctest

    import learner.lora

    result = doctest.testmod(learner.lora)
    assert result.attempted > 0 and result.failed == 0
