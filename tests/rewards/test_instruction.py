"""Each instruction-following constraint is met by a response that follows it and not otherwise."""

import pytest

from rewards.instruction import CHECKS, InstructionReward, check_constraints

# type, kwargs, a response that meets it, one that does not
CASES = [
    ("word_count", {"min": 5}, "one two three four five", "one two"),
    ("word_count", {"max": 3}, "short answer", "this one is far too long"),
    ("sentence_count", {"min": 2, "max": 2}, "First. Second!", "Only one here."),
    ("include_keywords", {"keywords": ["ocean", "tide"]}, "The Tide meets the ocean.", "The ocean is calm."),
    ("forbid_keywords", {"keywords": ["storm"]}, "Calm seas today.", "A storm is coming."),
    ("json_format", {}, '{"answer": [1, 2]}', "answer: [1, 2]"),
    ("bullet_count", {"n": 2}, "* apples\n* pears", "* apples\n* pears\n* plums"),
    ("all_uppercase", {}, "ALL CAPS HERE.", "Not All Caps."),
    ("all_lowercase", {}, "all lower here.", "Mixed Case."),
    ("start_with", {"phrase": "In short"}, "In short, yes.", "Yes, in short."),
    ("end_with", {"phrase": "Is there anything else?"}, "Done. Is there anything else?", "Is there anything else? Done."),
    ("paragraph_count", {"n": 3}, "One.\n\nTwo.\n\nThree.", "One.\nTwo.\nThree."),
]


def test_every_checker_has_a_case():
    assert {c[0] for c in CASES} == set(CHECKS)


@pytest.mark.parametrize("kind, kwargs, good, bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_constraint_met_and_violated(kind, kwargs, good, bad):
    c = {"type": kind, **kwargs}
    assert check_constraints(good, [c]) == [True]
    assert check_constraints(bad, [c]) == [False]


def test_score_is_the_fraction_met_or_all_or_nothing():
    constraints = [{"type": "all_lowercase"}, {"type": "word_count", "max": 3}, {"type": "end_with", "phrase": "bye"}]
    sample = {"completion": "<think>Plan It</think>\nok then, see you, bye", "meta": {"constraints": constraints}}
    [frac] = InstructionReward()([sample])
    [strict] = InstructionReward(mode="all")([sample])
    assert frac.score == pytest.approx(2 / 3) and frac.reason == "violated: word_count"
    assert strict.score == 0.0
    sample["completion"] = "ok, bye"
    assert InstructionReward(mode="all")([sample])[0].score == 1.0


def test_thinking_does_not_count_toward_the_answer():
    sample = {"completion": "<think>Lots Of Capitals</think>\nquiet answer", "meta": {"constraints": [{"type": "all_lowercase"}]}}
    assert InstructionReward()([sample])[0].score == 1.0


def test_bad_constraints_score_zero_with_a_reason():
    r1, r2 = InstructionReward()([
        {"completion": "x", "meta": {"constraints": [{"type": "rhymes"}]}},
        {"completion": "x", "meta": {}},
    ])
    assert (r1.score, r2.score) == (0.0, 0.0)
    assert "unknown constraint type 'rhymes'" in r1.reason and r2.reason == "sample has no constraints"
