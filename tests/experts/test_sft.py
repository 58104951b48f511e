"""SFT learns from assistant tokens only, and its loss falls by half within a CPU minute."""

from __future__ import annotations

import torch

from experts.data import DataConfig, load_samples
from experts.models import load_model, load_tokenizer
from experts import sft
from experts.sft import IGNORE, Config, build_rows, collate, encode_sft
from learner.batching import batch_plan
from learner.group import WorkerGroup
from tests.conftest import ARITH


def test_loss_mask_covers_the_assistant_reply_only(tiny_base):
    tok = load_tokenizer(tiny_base)
    sample = load_samples(DataConfig(**ARITH))[0]
    ids, labels = encode_sft(tok, sample, max_len=256)
    target = [t for t in labels if t != IGNORE]
    assert tok.decode(target) == sample["completion"] + tok.eos_token
    prompt_len = labels.index(next(t for t in labels if t != IGNORE))
    assert tok.decode(ids[:prompt_len]).endswith("<|im_start|>assistant\n")


def test_packing_fills_rows_and_keeps_every_token(tiny_base):
    tok = load_tokenizer(tiny_base)
    samples = load_samples(DataConfig(**ARITH))[:50]
    padded = build_rows(tok, samples, 64, packing=False)
    packed = build_rows(tok, samples, 64, packing=True)
    assert all(len(ids) == 64 for ids, _ in packed[:-1])
    assert sum(len(i) for i, _ in padded) == sum(len(i) for i, _ in packed)


def test_batch_plan_is_fixed_by_seed_so_a_resumed_run_sees_the_same_batches():
    assert batch_plan(10, 4, 6, seed=3) == batch_plan(10, 4, 6, seed=3)
    assert batch_plan(10, 4, 6, seed=3) != batch_plan(10, 4, 6, seed=4)
    assert sorted(sum(batch_plan(10, 5, 2, seed=0), [])) == list(range(10))  # one epoch, each row once


def test_sft_loss_falls_by_half_in_a_cpu_minute(tiny_base):
    cfg = Config(model=str(tiny_base), steps=60, batch_size=16, grad_accum=2, lr=3e-3, warmup_steps=5)
    group = WorkerGroup(str(tiny_base), cfg.learner, sft.optim(cfg), local=True)  # one rank, in this process
    tok = load_tokenizer(tiny_base)
    rows = build_rows(tok, load_samples(DataConfig(**ARITH)), cfg.max_len, packing=False)
    before = group.full_state_dict()
    losses = []
    for idx in batch_plan(len(rows), cfg.batch_size * cfg.grad_accum, cfg.steps, seed=0):
        losses.append(sft.train_step(group, [rows[i] for i in idx], cfg, tok.pad_token_id)["loss"])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"sft loss: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last <= 0.5 * first
    after = group.full_state_dict()
    changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)


def test_grad_accumulation_weights_every_token_equally(tiny_base):
    """Two micro-batches of unequal length give the gradient of one batch holding both."""
    tok = load_tokenizer(tiny_base)
    rows = build_rows(tok, load_samples(DataConfig(**ARITH))[:6], 64, packing=False)
    rows[0] = (rows[0][0] + rows[1][0], rows[0][1] + rows[1][1])  # make one row longer
    grads = []
    for micro in ([rows], [rows[:2], rows[2:]]):
        model = load_model(tiny_base)
        from experts.sft import token_loss_sum

        batches = [collate(m, tok.pad_token_id) for m in micro]
        n = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        for b in batches:
            (token_loss_sum(model, b)[0] / n).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_mix_gives_each_domain_its_share_of_every_step():
    """sft.mix: a small domain keeps its share (repeating its samples), each step holds the same split."""
    import pytest

    from learner.batching import mixed_plan

    small, large = list(range(5)), list(range(5, 105))
    plan = mixed_plan([small, large], [3, 1], per_step=8, steps=50, seed=1)
    for step in plan:
        assert sum(i < 5 for i in step) == 6 and len(step) == 8
    seen = [i for step in plan[:10] for i in step if i < 5]
    assert sorted(seen) == sorted(small * 12), "the small domain is walked in whole epochs"
    assert plan == mixed_plan([small, large], [3, 1], per_step=8, steps=50, seed=1), "fixed by the seed (resumable)"
    data = [{"domain": "math"}, {"domain": "code", "source": "generator", "task": "experts.tasks:code_samples"}]
    assert Config(model="m", data=data, mix={"math": 1, "code": 3}).mix == {"math": 1, "code": 3}
    with pytest.raises(ValueError, match="give a share for each domain"):
        Config(model="m", data=data, mix={"math": 1})
    with pytest.raises(ValueError, match="mix needs packing: false"):
        Config(model="m", data=data, mix={"math": 1, "code": 1}, packing=True)


def test_agent_episode_targets_mask_the_tool_observation_as_an_episode_renders_it(tiny_base):
    """meta.followup: the SFT row holds the tokens an episode holds; only the model's own turns are targets."""
    from experts.tasks import agent_samples
    from rollout.episodes import tool_turn_ids

    tok = load_tokenizer(tiny_base)
    sample = agent_samples(1, seed=3, system="Use tools.")[0]
    ids, labels = encode_sft(tok, sample, max_len=1024)
    observation = sample["meta"]["followup"][0]["content"]
    tool = tool_turn_ids(tok, observation, think=True)
    n = len(tool)
    starts = [i for i in range(len(ids) - n + 1) if ids[i : i + n] == tool]
    assert len(starts) == 1, "the observation turn appears once, token for token as an episode feeds it back"
    i = starts[0]
    assert all(lab == IGNORE for lab in labels[i : i + n]), "the tool's tokens are context, not targets"
    assert labels[i - 1] == tok.eos_token_id, "the tool-call turn ends with the end-of-turn token, trained"
    final = tok.decode([t for t, lab in zip(ids[i + n :], labels[i + n :]) if lab != IGNORE])
    assert final.endswith("Done.<|im_end|>") or final.endswith("Done." + tok.eos_token)
