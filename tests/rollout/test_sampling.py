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
