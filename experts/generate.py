"""Batched generation with Hugging Face `generate`: the CPU rollout backend, also used by eval."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generation:
    prompt_ids: list[int]
    completion_ids: list[int]  # up to and including the end-of-turn token when the model stopped
    text: str  # completion decoded without control tokens (markup such as <think> is kept)
    finished: bool  # False when cut off by max_new_tokens


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [batch, longest], padded on the left so every prompt ends where
    generation starts."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, e in enumerate(seqs):
        ids[j, width - len(e) :] = torch.tensor(e)
        mask[j, width - len(e) :] = 1
    return ids, mask


def render_prompt(tokenizer, messages: list[dict], enable_thinking: bool = True) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, enable_thinking=enable_thinking
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    enable_thinking: bool = True,
    seed: int | None = None,
) -> list[Generation]:
    """Complete each prompt (a list of chat messages); temperature 0 is greedy."""
    model.eval()
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    out: list[Generation] = []
    for i in range(0, len(prompts), batch_size):
        encoded = [render_prompt(tokenizer, m, enable_thinking) for m in prompts[i : i + batch_size]]
        ids, mask = left_pad(encoded, tokenizer.pad_token_id)
        width = ids.shape[1]
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        seqs = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        for j, e in enumerate(encoded):
            new = seqs[j, width:].tolist()
            finished = tokenizer.eos_token_id in new
            if finished:
                new = new[: new.index(tokenizer.eos_token_id) + 1]
            else:
                new = [t for t in new if t != tokenizer.pad_token_id]
            out.append(Generation(e, new, tokenizer.decode(new, skip_special_tokens=True), finished))
    return out


@dataclass
class TokenCompletion:
    """One completion of a token prompt, as the GRPO rollout needs it."""

    ids: list[int]  # new tokens, up to and including the stop token when one was produced
    logprobs: list[float]  # log pi(token) under softmax(logits / temperature), one per id
    stopped: bool  # False when cut off by max_new_tokens


@torch.no_grad()
def generate_tokens(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
) -> list[TokenCompletion]:
    """Sample a completion for each token prompt and return each token's log-prob.

    Log-probs come from the raw logits divided by `temperature` (1.0 when greedy), before top-p,
    which is what a learner computes for the same tokens; their gap to the learner's is a metric.
    """
    model.eval()
    device = next(model.parameters()).device
    out: list[TokenCompletion] = []
    t = temperature if temperature > 0 else 1.0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        width = ids.shape[1]
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        res = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids), pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True,
            top_k=0, **sampling,  # no top-k: sample from the policy itself
        )
        new = res.sequences[:, width:]
        logp = torch.stack(res.logits, 1).float().div(t).log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        stops = set(stop_ids)
        for j in range(len(chunk)):
            row = new[j].tolist()
            end = next((k + 1 for k, tok in enumerate(row) if tok in stops), None)
            n = end if end is not None else len(row)
            out.append(TokenCompletion(row[:n], logp[j, :n].tolist(), end is not None))
    return out
