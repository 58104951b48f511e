"""Math reward and eval metric: extract the final answer, check it against the gold with math-verify.

The GRPO reward (`MathReward`) and the eval metric (`math_correct`) call the same `is_equivalent`,
so a number the eval reports is the reward the expert was trained on.

Where the answer is looked for, in the visible answer (after `</think>`):
  1. the last `\\boxed{...}` (nested braces and escaped `\\{ \\}` allowed);
  2. else the last `Answer: ...` / `Final answer: ...` line, or "the answer is ...";
  3. else, if the whole answer is one short line, that line (the chat template's bare answer).
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from typing import Any, Sequence

from math_verify import parse, verify

from rewards.base import RewardResult, RewardTimeout, Sample, deadline
from rewards.format import split_think

log = logging.getLogger(__name__)


class _DropTimeoutNotice(logging.Filter):
    # math-verify warns that its timeout is off; ours (`deadline`) is on, so the warning misleads.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutNotice())

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_LINE = re.compile(r"^[ \t>*#_]*(?:final\s+)?answer[ \t*_]*[:：][ \t]*(.+?)[ \t]*$", re.I | re.M)
_ANSWER_IS = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\s*:?\s*(.+?)\s*(?:$|\.\s|\.$)", re.I | re.M)
_BARE_MAX_CHARS = 64
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_RATIONAL = re.compile(r"^-?\d+(?:\.\d+)?(?:/\d*[1-9]\d*)?$")  # 3, -0.25, 12/7: exact, no parser needed


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}; None if there is none or its braces never close."""
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    if i >= len(text):
        return None
    if text[i] != "{":  # "\boxed 5"
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":  # skip the escaped character: \{ and \} do not count
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
        j += 1
    return None


def _tidy(ans: str) -> str:
    ans = ans.strip().strip("*_").strip()
    if len(ans) >= 2 and ans[0] == ans[-1] == "$":
        ans = ans.strip("$").strip()
    return ans.rstrip(".").strip()


def extract_answer(completion: str) -> str | None:
    """The completion's final answer as a string, or None where it gives none.

    >>> extract_answer("<think>so 1/2</think>\\nThe area is \\\\boxed{\\\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_answer("<think>\\\\boxed{3}</think>\\nAnswer: 4")
    '4'
    >>> extract_answer("<think>long work</think>\\n$x = 7$")
    'x = 7'
    >>> extract_answer("<think>never closed \\\\boxed{3}") is None
    True
    """
    _, answer = split_think(completion)
    if not answer:
        return None
    if _BOX.search(answer) and _boxed(answer) is None:
        return None  # it meant to box an answer and did not finish
    for found in (_boxed(answer), _last(_ANSWER_LINE, answer), _last(_ANSWER_IS, answer)):
        if found:
            return _tidy(found) or None
    if "\n" not in answer and len(answer) <= _BARE_MAX_CHARS:
        return _tidy(answer) or None
    return None


def _last(pattern: re.Pattern, text: str) -> str | None:
    found = pattern.findall(text)
    return found[-1] if found else None


def _normal(s: str) -> str:
    return re.sub(r"\s+|\\[,!;: ]|\\left|\\right", "", s).rstrip(".")


def _as_latex(s: str) -> str:
    # Boxing tells math-verify "this whole string is the answer" (bare "1,2" would parse as 1.2).
    return s if ("\\boxed" in s or "$" in s) else f"\\boxed{{{s}}}"


def is_equivalent(pred: str, gold: Any) -> bool:
    """Whether `pred` equals `gold` mathematically (fractions, decimals, LaTeX, sets, intervals).

    No time limit of its own: callers wrap it in `rewards.base.deadline` (math-verify's own limit
    uses signal.alarm in whole seconds and refuses to run off the main thread, so it is off here).

    >>> is_equivalent("0.5", "\\\\frac{1}{2}"), is_equivalent("[1,2)", "(1,2]"), is_equivalent("1,000", "1000")
    (True, False, True)
    """
    gold = str(gold).strip()
    if _normal(pred) == _normal(gold):
        return True
    if "," not in gold and _THOUSANDS.match(pred.strip()):
        pred = pred.replace(",", "")
    p, g = _normal(pred), _normal(gold)
    if _RATIONAL.match(p) and _RATIONAL.match(g):  # exact arithmetic; math-verify's parse costs ~0.5 ms
        return Fraction(p) == Fraction(g)
    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    pred_parsed = parse(_as_latex(pred), parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def check(completion: str, answer: Any, timeout_s: float = 5.0) -> RewardResult:
    """Score one completion: 1.0 if its final answer equals `answer`, else 0.0 with the reason."""
    if answer is None or str(answer).strip() == "":
        return RewardResult(0.0, "sample has no gold answer")
    pred = extract_answer(completion)
    if pred is None:
        return RewardResult(0.0, "no final answer found")
    try:
        with deadline(timeout_s):
            ok = is_equivalent(pred, answer)
    except RewardTimeout:
        return RewardResult(0.0, f"answer check took longer than {timeout_s:g}s", {"extracted": pred})
    except Exception as e:  # math-verify and sympy raise many types on garbage input
        return RewardResult(0.0, f"answer check failed: {type(e).__name__}: {e}"[:200], {"extracted": pred})
    return RewardResult(1.0 if ok else 0.0, None if ok else "wrong answer", {"extracted": pred})


def math_correct(completion: str, answer: Any, timeout_s: float = 5.0) -> bool:
    """Eval metric: whether the completion's final answer equals `answer` (the reward's checker).

    >>> math_correct("<think>...</think>\\nAnswer: 0.25", "\\\\frac14")
    True
    """
    return check(completion, answer, timeout_s).score == 1.0


class MathReward:
    """1.0 when the final answer matches `sample["answer"]`, else 0.0 with a reason.

    Batched: a GRPO group shares one gold answer and its completions often agree, so each distinct
    (extracted answer, gold) pair in the batch is checked once.

    >>> r = MathReward()([{"completion": "Answer: 2/4", "answer": "0.5"}, {"completion": "I am not sure.\\nMaybe.", "answer": "1"}])
    >>> [(x.score, x.reason) for x in r]
    [(1.0, None), (0.0, 'no final answer found')]
    """

    name = "math"

    def __init__(self, timeout_s: float = 5.0):
        self.timeout_s = timeout_s

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        seen: dict[tuple[str, str], RewardResult] = {}
        out = []
        for s in samples:
            pred, gold = extract_answer(s["completion"]), s.get("answer")
            key = (pred, str(gold))
            if pred is None or key not in seen:
                result = check(s["completion"], gold, self.timeout_s)
                if pred is None:
                    out.append(result)
                    continue
                seen[key] = result
            r = seen[key]
            out.append(RewardResult(r.score, r.reason, dict(r.details)))
        return out
