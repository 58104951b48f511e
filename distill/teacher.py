"""The teachers' half of a round: each teacher in turn encodes the student's samples into the cache.

The student's half (sampling) is the one rollout (`rollout.worker`), on HF or vLLM like GRPO's.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Callable

import torch

from distill.cache import CacheWriter
from distill.loss import distill_loss
from rollout.types import Rollout

log = logging.getLogger(__name__)


def response_hidden(model, input_ids: list[torch.Tensor], prompt_lens: list[int], pad_id: int) -> torch.Tensor:
    """Last-layer states (after the final norm) at the positions that predict each response token.

    input_ids: per sample [prompt_len + response_len]; returns [sum of response lens, hidden], sample
    after sample. Sequences are right-padded, so positions start at 0 exactly as in generation and
    the causal mask keeps padding out of every kept position.
    """
    device = next(model.parameters()).device
    width = max(len(ids) for ids in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for j, seq in enumerate(input_ids):
        ids[j, : len(seq)] = seq.to(device)
        mask[j, : len(seq)] = 1
    states = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # [batch, width, hidden]
    # the state at position t predicts token t + 1: response tokens p..n-1 come from states p-1..n-2
    return torch.cat([states[j, p - 1 : len(seq) - 1] for j, (seq, p) in enumerate(zip(input_ids, prompt_lens))])


def write_teacher_cache(
    groups: dict[tuple[int, int], list[Rollout]],  # (teacher, step) -> that teacher's rollouts of that step
    teacher_paths: list[Path],
    writer: CacheWriter,
    pad_id: int,
    load: Callable[[Path], torch.nn.Module],
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> None:
    """Load each teacher in turn, encode its rollouts, append the response states to the cache, free it.

    Only one teacher model is in memory at a time; teachers with no rollouts are never loaded.
    """
    for t in sorted({t for t, _ in groups}):
        model = load(teacher_paths[t]).to(device).eval()
        n = 0
        with torch.inference_mode():
            for step in sorted(s for tt, s in groups if tt == t):
                rollouts = groups[(t, step)]
                for i in range(0, len(rollouts), batch_size):
                    chunk = rollouts[i : i + batch_size]
                    seqs = [torch.tensor(r.prompt_ids + r.response_ids) for r in chunk]
                    lens = [len(r.prompt_ids) for r in chunk]
                    states = response_hidden(model, seqs, lens, pad_id)
                    row = 0
                    for r, seq, p in zip(chunk, seqs, lens):
                        k = len(seq) - p
                        writer.add(t, r.sample_id, r.domain, seq.tolist(), p, states[row : row + k], step=step)
                        row += k
                n += len(rollouts)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("teacher %d (%s): cached %d samples", t, teacher_paths[t], n)


@torch.no_grad()
def on_policy_kl(student, teacher, tokenizer, samples: list[dict], max_new_tokens: int = 16, seed: int = 0,
                 divergence: str = "reverse_kl") -> float:
    """Mean per-token KL(student || teacher) over responses the student samples for `samples`.

    The measure OPD minimises, taken on held-out prompts to show the student moving toward a teacher.
    """
    from rollout.backends import HFBackend
    from rollout.config import RolloutConfig
    from rollout.worker import sample

    cfg = RolloutConfig(group_size=1, max_new_tokens=max_new_tokens, temperature=1.0, reasoning="think")
    torch.manual_seed(seed)
    rollouts = sample(HFBackend(student, tokenizer.pad_token_id, cfg), tokenizer, samples, cfg)
    seqs = [torch.tensor(r.prompt_ids + r.response_ids) for r in rollouts]
    lens = [len(r.prompt_ids) for r in rollouts]
    hs = response_hidden(student, seqs, lens, tokenizer.pad_token_id)
    ht = response_hidden(teacher, seqs, lens, tokenizer.pad_token_id)
    out = distill_loss(hs, student.get_output_embeddings().weight, ht, teacher.get_output_embeddings().weight,
                       divergence=divergence)
    return out.loss.item()
