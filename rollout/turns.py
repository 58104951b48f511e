"""Prompt rendering, and one assistant turn under a reasoning mode's think budget.

Reasoning modes (DeepSeek-V4's three, plus free thinking): `non_think` pre-fills an empty think
block; `think` thinks freely within the turn's limit; `think_high` thinks for at most
`think_budget` tokens; `think_max` may think until `answer_reserve` tokens before the limit. A
budget is enforced by generating up to it with `</think>` as a stop token, then, for rows still
thinking, appending `</think>\\n` (masked out of the loss: the model did not sample it) and
generating the answer. Two calls, no logits processor, so every backend shares it.
"""

from __future__ import annotations

from experts.models import THINK_CLOSE, THINK_OPEN
from rollout.backends import Backend
from rollout.config import RolloutConfig
from rollout.types import Turn


def render_prompt(tokenizer, messages: list[dict], enable_thinking: bool = True) -> list[int]:
    """Token ids of a chat up to and including the assistant header (and an empty think block when
    thinking is off)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         enable_thinking=enable_thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def complete_turns(backend: Backend, tokenizer, contexts: list[list[int]], limits: list[int],
                   cfg: RolloutConfig) -> list[Turn]:
    """Generate one assistant turn after each context, enforcing the reasoning mode's think budget.

    contexts: token ids ending with the assistant header (and the pre-filled empty think block in
    non_think mode); limits: each turn's token limit. Returns one `Turn` per context.
    """
    eos = tokenizer.eos_token_id
    close = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    open_ = tokenizer.convert_tokens_to_ids(THINK_OPEN)
    budget = cfg.budget()
    if budget is None or budget >= max(limits):
        outs = backend.complete(contexts, limits, [eos])
        return [Turn(o.ids, [1] * len(o.ids), o.logprobs, o.stopped) for o in outs]

    first = backend.complete(contexts, [min(budget, n) for n in limits], [eos, close])
    turns = [Turn(o.ids, [1] * len(o.ids), o.logprobs, o.stopped and o.ids[-1] == eos) for o in first]
    forced = tokenizer(THINK_CLOSE + "\n", add_special_tokens=False)["input_ids"]
    again = []
    for i, (t, o) in enumerate(zip(turns, first)):
        if t.finished or len(t.ids) >= limits[i]:
            continue
        if not o.stopped and open_ in t.ids and close not in t.ids:  # budget spent mid-thought: close it
            t.ids, t.mask, t.logprobs = t.ids + forced, t.mask + [0] * len(forced), t.logprobs + [0.0] * len(forced)
        again.append(i)
    if again:
        rest = backend.complete([contexts[i] + turns[i].ids for i in again],
                                [max(1, limits[i] - len(turns[i].ids)) for i in again], [eos])
        for i, o in zip(again, rest):
            t = turns[i]
            t.ids, t.mask, t.logprobs, t.finished = t.ids + o.ids, t.mask + [1] * len(o.ids), t.logprobs + o.logprobs, o.stopped
    return turns
