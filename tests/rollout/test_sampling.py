"""Rollouts sample the policy itself: no top-k, no checkpoint generation defaults, exact log-probs."""

from __future__ import annotations

import torch

from experts.models import load_model, load_tokenizer
from rollout.config import RolloutConfig
from rollout.worker import RolloutWorker


def test_hf_rollouts_ignore_the_checkpoints_generation_defaults(tiny_base, tmp_path):
    model, tok = load_model(tiny_base), load_tokenizer(tiny_base)
    model.generation_config.do_sample, model.generation_config.top_k = True, 1  # a model card's "greedy" default would make every sample the same
    model.generation_config.repetition_penalty = 5.0
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    worker = RolloutWorker(str(tmp_path / "m"), RolloutConfig(group_size=16, max_new_tokens=8, reasoning="non_think"))
    rollouts = worker.generate([{"id": 0, "domain": "math", "messages": [{"role": "user", "content": "1 + 2"}]}])
    assert len({tuple(r.response_ids) for r in rollouts}) > 1, "sampled, not greedy"
    # each token's rollout log-prob is the policy's own log-softmax at temperature 1 (no top-k renormalisation)
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1].log_softmax(-1)
        want = logp.gather(-1, ids[0, len(r.prompt_ids):, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(r.logprobs), want, atol=1e-4, rtol=0)


def test_the_hf_decode_loop_is_greedy_generate_token_for_token(tiny_base):
    """The plain decode loop (left padding, positions, shared prefill, KV cache) against transformers' `generate`."""
    from transformers import GenerationConfig

    from rollout.backends import HFBackend, left_pad

    model, tok = load_model(tiny_base), load_tokenizer(tiny_base)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, tok.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 24, (16,), generator=g)] * 2  # a repeated prompt is prefilled once
    limits = [12] * 16 + [int(n) for n in torch.randint(0, 12, (16,), generator=g)]  # per-row budgets, some 0
    stop = [tok.eos_token_id]
    ours = HFBackend(model, tok.pad_token_id, RolloutConfig(temperature=0)).complete(prompts, limits, stop)
    ids, mask = left_pad(prompts, tok.pad_token_id)
    ref = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
        do_sample=False, max_new_tokens=12, eos_token_id=stop, pad_token_id=tok.pad_token_id))[:, ids.shape[1]:]
    for c, row, n in zip(ours, ref.tolist(), limits):
        end = next((k + 1 for k, t in enumerate(row[:n]) if t in stop), None)
        assert c.ids == row[: end or n] and c.stopped == (end is not None)
        assert len(c.logprobs) == len(c.ids)


def test_draw_samples_softmax_and_never_a_masked_token():
    from rollout.backends import draw

    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    scores = p.log().expand(200_000, -1).contiguous()  # log 0 = -inf: masked
    torch.manual_seed(0)
    freq = torch.bincount(draw(scores), minlength=6).float() / 200_000
    assert freq[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)  # ~10 standard errors of margin


def test_sampling_scores_match_transformers_warpers():
    """top-k, top-p and the repetition penalty select the same tokens as transformers' processors."""
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from rollout.backends import sampling_scores

    g = torch.Generator().manual_seed(0)
    logits, seen = torch.randn(64, 50, generator=g) * 3, torch.randint(0, 50, (64, 7), generator=g)
    cfg = RolloutConfig(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    ours = sampling_scores(logits, cfg, seen)
    ref = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.8)):
        ref = proc(seen, ref)
    assert torch.equal(ours.isinf(), ref.isinf())
    kept = ~ours.isinf()
    torch.testing.assert_close(ours[kept], ref[kept])


def test_each_domain_samples_with_its_own_limits(tiny_base):
    """rollout.domains: a mixed batch gives math its own budget and reasoning mode, the rest the base config's."""
    from rollout.worker import RolloutWorker

    cfg = RolloutConfig(group_size=3, max_new_tokens=12, reasoning="think", temperature=1.0,
                        domains={"math": {"max_new_tokens": 3, "reasoning": "non_think"}})
    worker = RolloutWorker(str(tiny_base), cfg, seed=0)
    samples = [{"id": i, "domain": d, "messages": [{"role": "user", "content": f"{d} {i}"}]}
               for i, d in enumerate(["code", "math", "code", "math"])]
    rollouts = worker.generate(samples, first_group=10)
    assert [r.group for r in rollouts] == [g for g in (10, 11, 12, 13) for _ in range(3)], "groups in sample order"
    assert [r.domain for r in rollouts] == [r.sample["domain"] for r in rollouts]
    for r in rollouts:
        assert r.sample is samples[r.group - 10]
        limit = 3 if r.domain == "math" else 12
        assert len(r.response_ids) <= limit
    tok = worker.tokenizer
    math_prompt = tok.decode(next(r for r in rollouts if r.domain == "math").prompt_ids)
    code_prompt = tok.decode(next(r for r in rollouts if r.domain == "code").prompt_ids)
    assert math_prompt.rstrip().endswith("</think>"), "non_think pre-fills an empty think block for math"
    assert not code_prompt.rstrip().endswith("</think>")
    assert max(len(r.response_ids) for r in rollouts if r.domain == "code") > 3, "the base budget is not cut"
