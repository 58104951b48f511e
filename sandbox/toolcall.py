"""Parse and format agent tool calls (pure functions; rollouts, rewards and the CLI share them).

An assistant turn is free reasoning text followed by a call in this XML-with-special-tokens form:

    <|tool_call|><invoke name="bash"><parameter name="command">ls -la</parameter></invoke><|/tool_call|>

Parameter bodies travel unescaped: code goes in as written, `<`, `&` and quotes included, so a
model never has to learn XML escaping. The one string a body cannot contain is `</parameter>`.
A tool's output goes back as a `tool` role message whose content is
`<|tool_result|>…<|/tool_result|>`. The reasoning before a call stays in the assistant message,
so later turns still see it.

`parse` never raises: malformed, partial, unknown or too many calls come back as `errors`, and
`error_observation` turns them into the text the model sees next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CALL_OPEN, CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"
RESULT_OPEN, RESULT_CLOSE = "<|tool_result|>", "<|/tool_result|>"

# name -> (required parameters, what the tool does)
TOOLS: dict[str, tuple[tuple[str, ...], str]] = {
    "bash": (("command",), "Run a bash command in the working directory /work."),
    "python": (("code",), "Run a Python 3 program in /work."),
    "write_file": (("path", "content"), "Write content to a file (path relative to /work)."),
    "read_file": (("path",), "Read a file (path relative to /work)."),
}

_INVOKE = re.compile(r'\s*<invoke\s+name="([^"]*)"\s*>(.*)</invoke>\s*\Z', re.S)
_PARAM = re.compile(r'<parameter\s+name="([^"]*)"\s*>(.*?)</parameter>', re.S)


@dataclass(frozen=True)
class ToolCall:
    name: str
    args: dict[str, str]


@dataclass(frozen=True)
class ParsedTurn:
    """What one assistant message holds: its reasoning text, well-formed calls, and parse errors."""

    reasoning: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def format_call(name: str, **args: str) -> str:
    """The text of one tool call, parameters in the order given.

    >>> format_call("bash", command="echo 'a<b' && ls")
    '<|tool_call|><invoke name="bash"><parameter name="command">echo \\'a<b\\' && ls</parameter></invoke><|/tool_call|>'
    """
    params = "".join(f'<parameter name="{k}">{v}</parameter>' for k, v in args.items())
    return f'{CALL_OPEN}<invoke name="{name}">{params}</invoke>{CALL_CLOSE}'


def format_result(text: str) -> str:
    """A tool's output between its special tokens, as our chat template renders a `tool` turn.

    >>> format_result("hi\\n")
    '<|tool_result|>hi\\n<|/tool_result|>'
    """
    return f"{RESULT_OPEN}{text}{RESULT_CLOSE}"


def tool_message(text: str) -> dict[str, str]:
    """The chat message that carries a tool result back to the model.

    The content is the bare output: the chat template adds `<|tool_result|>` markers (ours) or
    whatever its own model expects, so a transcript renders right under any template.

    >>> tool_message("ok")
    {'role': 'tool', 'content': 'ok'}
    """
    return {"role": "tool", "content": text}


def parse(text: str, max_calls: int = 1) -> ParsedTurn:
    """Split an assistant message into reasoning, calls and errors; never raises.

    >>> t = parse('I will look.\\n' + format_call("python", code="print(1 < 2)"))
    >>> t.reasoning, t.calls, t.errors
    ('I will look.', [ToolCall(name='python', args={'code': 'print(1 < 2)'})], [])
    >>> parse("just an answer").calls
    []
    >>> parse('<|tool_call|><invoke name="bash"><parameter name="command">ls').errors
    ['tool call 1 is not closed with <|/tool_call|>']
    >>> parse(format_call("rm_rf", path="/")).errors
    ["tool call 1: unknown tool 'rm_rf' (tools: bash, python, write_file, read_file)"]
    >>> parse(format_call("write_file", path="a.txt")).errors
    ['tool call 1 (write_file): missing parameter content']
    >>> parse(format_call("bash", command="a") + format_call("bash", command="b")).errors
    ['2 tool calls in one turn; make exactly 1 per turn']
    """
    first = text.find(CALL_OPEN)
    reasoning = (text if first < 0 else text[:first]).strip()
    calls: list[ToolCall] = []
    errors: list[str] = []
    pos, n = first, 0
    while pos >= 0:
        n += 1
        body_start = pos + len(CALL_OPEN)
        end = text.find(CALL_CLOSE, body_start)
        if end < 0:
            errors.append(f"tool call {n} is not closed with {CALL_CLOSE}")
            break
        call, error = _parse_one(text[body_start:end], n)
        if error:
            errors.append(error)
        else:
            calls.append(call)
        pos = text.find(CALL_OPEN, end + len(CALL_CLOSE))
    if first < 0 and CALL_CLOSE in text:
        errors.append(f"found {CALL_CLOSE} without a {CALL_OPEN} before it")
    if n > max_calls:
        return ParsedTurn(reasoning, [], [f"{n} tool calls in one turn; make exactly {max_calls} per turn"])
    return ParsedTurn(reasoning, calls, errors)


def _parse_one(body: str, n: int) -> tuple[ToolCall | None, str | None]:
    m = _INVOKE.match(body)
    if m is None:
        return None, f'tool call {n}: expected <invoke name="TOOL">…</invoke> inside {CALL_OPEN}…{CALL_CLOSE}'
    name, inner = m.group(1), m.group(2)
    if name not in TOOLS:
        return None, f"tool call {n}: unknown tool {name!r} (tools: {', '.join(TOOLS)})"
    args = dict(_PARAM.findall(inner))
    leftover = _PARAM.sub("", inner).strip()
    if leftover:
        return None, f"tool call {n} ({name}): text outside <parameter> tags: {leftover[:60]!r}"
    required = TOOLS[name][0]
    if missing := [p for p in required if p not in args]:
        return None, f"tool call {n} ({name}): missing parameter {', '.join(missing)}"
    if extra := [p for p in args if p not in required]:
        return None, f"tool call {n} ({name}): unknown parameter {', '.join(extra)}"
    return ToolCall(name, args), None


def error_observation(errors: list[str]) -> str:
    """The observation a model gets for a turn that could not be parsed.

    >>> print(error_observation(["tool call 1: unknown tool 'x' (tools: bash)"]))
    parse error: tool call 1: unknown tool 'x' (tools: bash)
    Nothing was run. Make one call as <|tool_call|><invoke name="TOOL"><parameter name="NAME">VALUE</parameter></invoke><|/tool_call|>
    """
    example = format_call("TOOL", NAME="VALUE")
    return "parse error: " + "; ".join(errors) + f"\nNothing was run. Make one call as {example}"


def tools_prompt() -> str:
    """System-prompt text that teaches the call format and lists the tools."""
    lines = [
        "You can use tools. To call one, end your message with exactly one call:",
        format_call("bash", command="ls -la"),
        "Parameter values are raw text: write code as is, with no XML escaping.",
        f"The result comes back as {RESULT_OPEN}…{RESULT_CLOSE}. When the task is done, answer without a call.",
        "Tools:",
    ]
    lines += [f"- {name}({', '.join(params)}): {desc}" for name, (params, desc) in TOOLS.items()]
    return "\n".join(lines)
