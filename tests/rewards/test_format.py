"""The format reward accepts our chat template's shape and names what is wrong otherwise."""

import pytest

from rewards.format import FormatReward, format_problems
from sandbox.toolcall import format_call

CALL = format_call("bash", command="ls -la && echo 'a<b'")  # raw bodies: no XML escaping


@pytest.mark.parametrize(
    "completion",
    ["<think>\nplan\n</think>\nThe answer is 4.", "4", f"<think>look first</think>\n{CALL}", "<think>\n</think>\nhi"],
)
def test_well_formed_responses_score_one(completion):
    [r] = FormatReward()([{"completion": completion}])
    assert (r.score, r.reason) == (1.0, None)


@pytest.mark.parametrize(
    "completion, problem",
    [
        ("<think>still thinking", "think block is not closed"),
        ("<think>a</think>\n", "no answer"),
        ("intro <think>a</think> 4", "text before <think>"),
        ("<think>a</think><think>b</think> 4", "expected one <think>"),
        ("4 </think>", "expected one <think>"),
        ("<think>a</think>" + CALL.replace("</parameter>", ""), "text outside <parameter> tags"),
        ("<think>a</think><|tool_call|><invoke><parameter name='x'>1</parameter></invoke><|/tool_call|>",
         'expected <invoke name="TOOL">'),
        ("<think>a</think>" + CALL.replace("<|/tool_call|>", ""), "not closed with <|/tool_call|>"),
        ("<think>a</think>" + CALL.replace("bash", "rm_rf"), "unknown tool 'rm_rf'"),
        ("<think>a</think>" + CALL + CALL, "2 tool calls in one turn"),
    ],
)
def test_malformed_responses_score_zero_with_the_problem(completion, problem):
    [r] = FormatReward()([{"completion": completion}])
    assert r.score == 0.0 and problem in r.reason
    assert problem in "; ".join(format_problems(completion))
