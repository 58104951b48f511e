"""The math checker: equivalent forms score 1, near misses and garbage 0 with a reason, fast."""

import time

import pytest

from rewards import math_answer
from rewards.math_answer import MathReward, extract_answer, math_correct


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "0.5"),
        ("\\frac12", "\\dfrac{1}{2}"),
        ("3.0", "3"),
        ("\\{2, 1\\}", "\\{1,2\\}"),
        ("[1, 2)", "[1,2)"),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
        ("(x+1)^2", "x^2+2x+1"),
        ("50\\%", "0.5"),
        ("1,000", "1000"),
    ],
)
def test_equivalent_forms_are_correct(pred, gold):
    assert math_correct(f"<think>work</think>\nThe answer is \\boxed{{{pred}}}.", gold)


@pytest.mark.parametrize(
    "pred, gold",
    [("0.51", "1/2"), ("(1,2]", "[1,2)"), ("\\{1,2,3\\}", "\\{1,2\\}"), ("10.01", "10"), ("-3", "3"), ("x+1", "x-1")],
)
def test_near_misses_are_wrong(pred, gold):
    assert not math_correct(f"\\boxed{{{pred}}}", gold)


def test_answer_is_found_where_the_template_puts_it():
    assert extract_answer("so \\boxed{\\frac{a}{\\sqrt{b^{2}}}} done") == "\\frac{a}{\\sqrt{b^{2}}}"
    assert extract_answer("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_answer("Work...\n**Final Answer:** $42$\n") == "42"
    assert extract_answer("<think>I guess \\boxed{1}</think>\n7") == "7"  # thinking is not the answer
    assert extract_answer("<think>\\boxed{1}") is None  # never stopped thinking
    assert extract_answer("a long essay\nwith lines\nand no answer marker") is None
    assert extract_answer("\\boxed{unclosed") is None


def test_garbage_scores_zero_with_a_reason():
    samples = [
        {"completion": "\\boxed{}}}{{\\frac", "answer": "1"},
        {"completion": "", "answer": "1"},
        {"completion": "Answer: 3", "answer": None},
        {"completion": "Answer: \\sqrt{{{", "answer": "2"},
    ]
    results = MathReward()(samples)
    assert [r.score for r in results] == [0.0] * 4
    assert all(r.reason for r in results)
    assert results[2].reason == "sample has no gold answer"


def test_a_slow_check_stops_at_the_time_limit(monkeypatch):
    monkeypatch.setattr(math_answer, "is_equivalent", lambda pred, gold: time.sleep(5))
    t0 = time.perf_counter()
    [r] = MathReward(timeout_s=0.2)([{"completion": "Answer: 2", "answer": "3"}])
    assert time.perf_counter() - t0 < 2
    assert r.score == 0.0 and "longer than 0.2s" in r.reason


def test_batch_checks_each_distinct_answer_once(monkeypatch):
    calls = []
    real = math_answer.is_equivalent
    monkeypatch.setattr(math_answer, "is_equivalent", lambda p, g: calls.append(p) or real(p, g))
    group = [{"completion": f"Answer: {a}", "answer": "1/2"} for a in ["0.5", "0.5", "2/4", "0.5", "7"]]
    assert [r.score for r in MathReward()(group)] == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert sorted(calls) == ["0.5", "2/4", "7"]
