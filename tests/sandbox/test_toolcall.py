"""The tool-call format: round trips, unescaped code, and clear errors instead of exceptions."""

import doctest

import pytest

import sandbox.episode
import sandbox.image
import sandbox.pool
from sandbox import toolcall
from sandbox.toolcall import ToolCall, format_call, parse


@pytest.mark.parametrize("module", [toolcall, sandbox.episode, sandbox.image, sandbox.pool])
def test_doctests_pass(module):
    assert doctest.testmod(module).failed == 0


def test_code_travels_unescaped_and_round_trips():
    code = 'if a < b and c > d:\n    print("<&>", \'x\')\n'
    t = parse("Reasoning first.\n\n" + format_call("python", code=code))
    assert t.calls == [ToolCall("python", {"code": code})] and t.reasoning == "Reasoning first."


@pytest.mark.parametrize("text, error", [
    ("<|tool_call|><invoke name=\"bash\">", "not closed"),
    ("<|tool_call|>bash ls<|/tool_call|>", "expected <invoke"),
    ('<|tool_call|><invoke name="bash"><parameter name="cmd">ls</parameter></invoke><|/tool_call|>', "missing parameter command"),
    ('<|tool_call|><invoke name="bash"><parameter name="command">ls</parameter>junk</invoke><|/tool_call|>', "text outside"),
    ('ls<|/tool_call|>', "without a"),
    (format_call("bash", command="a") * 3, "3 tool calls"),
    ('<|tool_call|><invoke name="read_file"><parameter name="path">a</parameter><parameter name="x">1</parameter></invoke><|/tool_call|>', "unknown parameter x"),
])
def test_malformed_partial_or_several_calls_give_an_error_never_an_exception(text, error):
    t = parse(text)
    assert t.calls == [] and any(error in e for e in t.errors), t
    assert toolcall.error_observation(t.errors).startswith("parse error: ")


def test_tools_prompt_names_every_tool():
    prompt = toolcall.tools_prompt()
    assert all(name in prompt for name in toolcall.TOOLS)
