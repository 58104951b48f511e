"""Format reward: the response is well formed for our chat template (`experts.models.CHAT_TEMPLATE`).

Well formed means: a think block, if any, opens at the start and is closed exactly once
(`<think>...</think>` then the answer); every tool call is valid XML of the form
`<|tool_call|><invoke name="..."><parameter name="...">...</parameter></invoke><|/tool_call|>`
(parsed by `sandbox.toolcall`, the episode runner's own parser);
and there is an answer (non-empty text after the think block, or a tool call).
"""

from __future__ import annotations

from typing import Sequence

from rewards.base import RewardResult, Sample
from sandbox import toolcall

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_think(completion: str) -> tuple[str | None, str | None]:
    """(thinking, answer) of a completion; answer is None while the think block is still open.

    >>> split_think("<think>\\n2+2</think>\\n4")
    ('2+2', '4')
    >>> split_think("4")
    (None, '4')
    >>> split_think("<think>still going")
    ('still going', None)
    """
    if THINK_CLOSE in completion:
        head, _, tail = completion.rpartition(THINK_CLOSE)
        return head.replace(THINK_OPEN, "", 1).strip(), tail.strip()
    if THINK_OPEN in completion:
        return completion.split(THINK_OPEN, 1)[1].strip(), None
    return None, completion.strip()


def answer_text(completion: str) -> str:
    """The visible answer: text after the think block ("" while thinking never ended).

    >>> answer_text("<think>hm</think>\\nHello.")
    'Hello.'
    """
    return split_think(completion)[1] or ""


def tool_call_errors(text: str) -> list[str]:
    """Problems with the tool calls in `text` (empty when every call is well formed).

    Uses the sandbox's parser, so "well formed" here is exactly what the episode runner executes
    (one call per turn, known tools, required parameters; bodies are raw text, not escaped XML).

    >>> tool_call_errors('<|tool_call|><invoke name="bash"><parameter name="command">ls</parameter></invoke><|/tool_call|>')
    []
    >>> tool_call_errors('<|tool_call|><invoke name="bash"><parameter>ls</invoke><|/tool_call|>')
    ["tool call 1 (bash): text outside <parameter> tags: '<parameter>ls'"]
    """
    return toolcall.parse(text).errors


def format_problems(completion: str) -> list[str]:
    """Everything wrong with the response's shape, in the order a reader would notice it.

    >>> format_problems("<think>plan</think>\\nDone.")
    []
    >>> format_problems("<think>plan, never finished")
    ['think block is not closed', 'no answer']
    """
    problems = []
    n_open, n_close = completion.count(THINK_OPEN), completion.count(THINK_CLOSE)
    if n_open or n_close:
        if n_open != 1 or n_close != 1:
            problems.append("think block is not closed" if n_open > n_close else
                            f"expected one <think>...</think>, got {n_open} open and {n_close} close")
        elif not completion.lstrip().startswith(THINK_OPEN):
            problems.append("text before <think>")
        elif completion.index(THINK_CLOSE) < completion.index(THINK_OPEN):
            problems.append("</think> before <think>")
    answer = split_think(completion)[1]
    problems += tool_call_errors(answer or "")
    if not answer:
        problems.append("no answer")
    return problems


class FormatReward:
    """1.0 for a well-formed response, 0.0 with the problems as the reason otherwise.

    >>> FormatReward()([{"completion": "<think>x</think>\\n42"}, {"completion": "<think>x"}])[1].reason
    'think block is not closed; no answer'
    """

    name = "format"

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            problems = format_problems(s["completion"])
            out.append(RewardResult(0.0 if problems else 1.0, "; ".join(problems) or None))
        return out
