"""Instruction-following reward: verifiable constraints in the spirit of IFEval (Zhou et al., 2023).

A prompt's constraints live in `sample["meta"]["constraints"]` as `[{"type": ..., **kwargs}]`;
each type is a small pure function `check(text, **kwargs) -> bool` in `CHECKS`, applied to the
visible answer (after `</think>`). The score is the fraction satisfied, or 1/0 with `mode: all`.
Words are whitespace-separated tokens; sentences end in . ! or ?; paragraphs are separated by
blank lines; keywords match whole words, case-insensitively; phrases match case-insensitively.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Literal, Sequence

from rewards.base import RewardResult, Sample
from rewards.format import answer_text


def _within(n: int, min: int | None, max: int | None) -> bool:
    return (min is None or n >= min) and (max is None or n <= max)


def word_count(text: str, min: int | None = None, max: int | None = None) -> bool:
    """Between `min` and `max` words (either bound may be left out).

    >>> word_count("one two three", min=3), word_count("one two three", max=2)
    (True, False)
    """
    return _within(len(text.split()), min, max)


def count_sentences(text: str) -> int:
    return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)])


def sentence_count(text: str, min: int | None = None, max: int | None = None) -> bool:
    """Between `min` and `max` sentences.

    >>> sentence_count("Hi there. How are you? Fine!", min=3, max=3), sentence_count("One.", min=2)
    (True, False)
    """
    return _within(count_sentences(text), min, max)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.I) is not None


def include_keywords(text: str, keywords: list[str]) -> bool:
    """Every keyword appears as a whole word.

    >>> include_keywords("Rivers feed the Ocean.", ["ocean", "river"])
    False
    >>> include_keywords("Rivers feed the Ocean.", ["ocean", "rivers"])
    True
    """
    return all(_has_word(text, k) for k in keywords)


def forbid_keywords(text: str, keywords: list[str]) -> bool:
    """No keyword appears as a whole word.

    >>> forbid_keywords("A calm sea.", ["storm"]), forbid_keywords("A Storm!", ["storm"])
    (True, False)
    """
    return not any(_has_word(text, k) for k in keywords)


def json_format(text: str) -> bool:
    """The whole answer is JSON (a ```json fence around it is allowed).

    >>> json_format('```json\\n{"a": 1}\\n```'), json_format('Sure: {"a": 1}')
    (True, False)
    """
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def bullet_count(text: str, n: int) -> bool:
    """Exactly `n` markdown bullet lines (`* ` or `- `).

    >>> bullet_count("* a\\n* b\\n- c", 3), bullet_count("* a", 2)
    (True, False)
    """
    return len(re.findall(r"^\s*[*-]\s+\S", text, re.M)) == n


def all_uppercase(text: str) -> bool:
    """No lowercase letters (and some letters at all).

    >>> all_uppercase("HELLO, WORLD!"), all_uppercase("Hello")
    (True, False)
    """
    return text.upper() == text and any(c.isalpha() for c in text)


def all_lowercase(text: str) -> bool:
    """No uppercase letters (and some letters at all).

    >>> all_lowercase("hello, world!"), all_lowercase("hello World")
    (True, False)
    """
    return text.lower() == text and any(c.isalpha() for c in text)


def start_with(text: str, phrase: str) -> bool:
    """Starts with `phrase`.

    >>> start_with("Dear reader, hi.", "dear reader"), start_with("Hi.", "Dear")
    (True, False)
    """
    return text.strip().lower().startswith(phrase.strip().lower())


def end_with(text: str, phrase: str) -> bool:
    """Ends with `phrase` exactly, nothing after it.

    >>> end_with("Bye. Any other questions?", "any other questions?"), end_with("Bye!", "Bye")
    (True, False)
    """
    return text.strip().lower().endswith(phrase.strip().lower())


def paragraph_count(text: str, n: int) -> bool:
    """Exactly `n` non-empty paragraphs separated by blank lines.

    >>> paragraph_count("First.\\n\\nSecond.", 2), paragraph_count("Only one.", 2)
    (True, False)
    """
    return len([p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]) == n


CHECKS: dict[str, Callable[..., bool]] = {
    f.__name__: f
    for f in (word_count, sentence_count, include_keywords, forbid_keywords, json_format, bullet_count,
              all_uppercase, all_lowercase, start_with, end_with, paragraph_count)
}


def check_constraints(text: str, constraints: Sequence[dict[str, Any]]) -> list[bool]:
    """Whether `text` meets each constraint; an unknown type or bad kwargs raises ValueError.

    >>> check_constraints("HI THERE.", [{"type": "all_uppercase"}, {"type": "word_count", "min": 5}])
    [True, False]
    """
    out = []
    for c in constraints:
        kwargs = {k: v for k, v in c.items() if k != "type"}
        fn = CHECKS.get(c.get("type"))
        if fn is None:
            raise ValueError(f"unknown constraint type {c.get('type')!r}; known: {', '.join(CHECKS)}")
        try:
            out.append(bool(fn(text, **kwargs)))
        except TypeError as e:
            raise ValueError(f"constraint {c}: {e}") from None
    return out


class InstructionReward:
    """Fraction of the prompt's constraints the answer meets (`mode="all"`: 1.0 only if all are).

    >>> s = {"completion": "<think>ok</think>\\nHELLO.", "meta": {"constraints": [
    ...     {"type": "all_uppercase"}, {"type": "end_with", "phrase": "bye"}]}}
    >>> r = InstructionReward()([s])[0]
    >>> r.score, r.reason
    (0.5, 'violated: end_with')
    """

    name = "instruction"

    def __init__(self, mode: Literal["fraction", "all"] = "fraction"):
        if mode not in ("fraction", "all"):
            raise ValueError(f"mode must be 'fraction' or 'all', got {mode!r}")
        self.mode = mode

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            constraints = (s.get("meta") or {}).get("constraints") or []
            if not constraints:
                out.append(RewardResult(0.0, "sample has no constraints"))
                continue
            try:
                met = check_constraints(answer_text(s["completion"]), constraints)
            except ValueError as e:
                out.append(RewardResult(0.0, str(e)))
                continue
            frac = sum(met) / len(met)
            score = frac if self.mode == "fraction" else float(all(met))
            violated = [c["type"] for c, ok in zip(constraints, met) if not ok]
            out.append(RewardResult(score, f"violated: {', '.join(violated)}" if violated else None,
                                    {"satisfied": sum(met), "total": len(met)}))
        return out
