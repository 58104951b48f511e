"""Instruction-following reward: verifiable constraints, in our schema or in IFEval's (Zhou et al., 2023).

A prompt's constraints live in `sample["meta"]` in one of two shapes:
- ours: `constraints: [{"type": ..., **kwargs}]`, each type a small pure function
  `check(text, **kwargs) -> bool` in `CHECKS`;
- IFEval's: `instruction_id_list: [...]` with `kwargs: [{...}, ...]`, one dict per id, checked
  with IFEval's semantics by `rewards.ifeval` (which says which ids it supports and why it is a port).
Either is applied to the visible answer (after `</think>`). The score is the fraction satisfied
(IFEval's instruction-level accuracy) or 1/0 with `mode: all` (prompt-level); `strictness: loose`
also tries IFEval's loose variants of the answer (first/last line dropped, '*' removed).
Words are whitespace-separated tokens; sentences end in . ! or ?; paragraphs are separated by
blank lines; keywords match whole words, case-insensitively; phrases match case-insensitively.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Literal, Sequence

from rewards.base import RewardResult, Sample
from rewards.format import answer_text
from rewards.ifeval import check_instructions, response_variants


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


def check_constraints(text: str, constraints: Sequence[dict[str, Any]], loose: bool = False) -> list[bool]:
    """Whether `text` meets each constraint (`loose`: any of IFEval's loose variants of it does);
    an unknown type or bad kwargs raises ValueError.

    >>> check_constraints("HI THERE.", [{"type": "all_uppercase"}, {"type": "word_count", "min": 5}])
    [True, False]
    """
    variants = response_variants(text, loose)
    out = []
    for c in constraints:
        kwargs = {k: v for k, v in c.items() if k != "type"}
        fn = CHECKS.get(c.get("type"))
        if fn is None:
            raise ValueError(f"unknown constraint type {c.get('type')!r}; known: {', '.join(CHECKS)}")
        try:
            out.append(any(bool(fn(v, **kwargs)) for v in variants if v.strip() or not loose))
        except TypeError as e:
            raise ValueError(f"constraint {c}: {e}") from None
    return out


def check_sample(text: str, meta: dict[str, Any], loose: bool = False) -> tuple[list[str], list[bool]]:
    """The names of a sample's constraints (ours or IFEval's) and whether `text` meets each.

    An empty list where it has none; ValueError (one line) for an unknown type or an unsupported id.

    >>> check_sample("a, b", {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
    (['punctuation:no_comma'], [False])
    """
    if meta.get("instruction_id_list"):
        ids = list(meta["instruction_id_list"])
        return ids, check_instructions(text, ids, meta.get("kwargs"), loose=loose)
    constraints = meta.get("constraints") or []
    return [c.get("type") for c in constraints], check_constraints(text, constraints, loose=loose)


class InstructionReward:
    """Fraction of the prompt's constraints the answer meets (`mode="all"`: 1.0 only if all are).

    `strictness="loose"` also accepts an answer whose variant (IFEval's: first or last line dropped,
    '*' removed) meets a constraint. A sample whose constraints cannot be checked (an unknown type, an
    unsupported IFEval id, bad kwargs) scores 0.0 with the reason and `failed` in its details, so GRPO
    leaves it out rather than train on a score the answer did not earn; the rest of the batch is scored.

    >>> s = {"completion": "<think>ok</think>\\nHELLO.", "meta": {"constraints": [
    ...     {"type": "all_uppercase"}, {"type": "end_with", "phrase": "bye"}]}}
    >>> r = InstructionReward()([s])[0]
    >>> r.score, r.reason
    (0.5, 'violated: end_with')
    >>> s = {"completion": "Sure, here it is:\\nall lower case", "meta": {
    ...     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}}
    >>> InstructionReward(strictness="strict")([s])[0].score, InstructionReward(strictness="loose")([s])[0].score
    (0.0, 1.0)
    """

    name = "instruction"

    def __init__(self, mode: Literal["fraction", "all"] = "fraction",
                 strictness: Literal["strict", "loose"] = "strict"):
        if mode not in ("fraction", "all"):
            raise ValueError(f"mode must be 'fraction' or 'all', got {mode!r}")
        if strictness not in ("strict", "loose"):
            raise ValueError(f"strictness must be 'strict' or 'loose', got {strictness!r}")
        self.mode = mode
        self.strictness = strictness

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        out = []
        for s in samples:
            try:
                names, met = check_sample(answer_text(s["completion"]), s.get("meta") or {},
                                          loose=self.strictness == "loose")
            except ValueError as e:
                out.append(RewardResult(0.0, str(e), {"failed": True}))
                continue
            if not met:
                out.append(RewardResult(0.0, "sample has no constraints"))
                continue
            frac = sum(met) / len(met)
            score = frac if self.mode == "fraction" else float(all(met))
            violated = [n for n, ok in zip(names, met) if not ok]
            out.append(RewardResult(score, f"violated: {', '.join(violated)}" if violated else None,
                                    {"satisfied": sum(met), "total": len(met)}))
        return out
