"""Seeded task generators for the experts' domains; a workflow reads them with `source: generator`:

    data: {domain: code, source: generator, task: "experts.tasks:code_samples", size: 600, heldout: 50}

Each function returns sample dicts in `experts.data`'s shape, with an SFT `completion` that passes
its domain's reward. math uses reasoning-gym directly (`source: reasoning_gym`), so it is not here.

- `echo_samples`: "Repeat the digits 5 3 8." -> \\boxed{538}. A verifiable task a ~100k-parameter
  model learns in a CPU minute and generalises on (copying, not memorising a table), which is
  what the GRPO learning test and the bench need.
- `code_samples`: tiny Python functions with `assert` unit tests in `meta.tests` (rewards.code_tests).
- `agent_samples`: sandbox tasks (`sandbox.episode.Task` in `meta.task`) whose check script decides.
- `instruction_samples`: IFEval-style prompts from `rewards.if_data`.
"""

from __future__ import annotations

import random

NO_THINK = "<think>\n</think>\n"


def echo_samples(n: int, digits: int = 3, seed: int = 0) -> list[dict]:
    """`n` copy tasks of `digits` digits; the answer is the digits as one number.

    >>> s = echo_samples(1, seed=1)[0]
    >>> s["prompt"], s["answer"], s["completion"][-12:]
    ('Repeat the digits 3 2 5.', '325', '\\n\\\\boxed{325}')
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ds = [str(rng.randint(1, 9)) for _ in range(digits)]
        ans = "".join(ds)
        out.append({"id": f"echo-{seed}-{i}", "domain": "math", "prompt": f"Repeat the digits {' '.join(ds)}.",
                    "answer": ans, "completion": NO_THINK + f"\\boxed{{{ans}}}", "meta": {"task": "echo"}})
    return out


_CODE = [  # (name, signature body builder, reference implementation, test inputs)
    ("add", "a, b", "return a + b", lambda r: (r.randint(-9, 9), r.randint(-9, 9)), lambda a, b: a + b),
    ("mul", "a, b", "return a * b", lambda r: (r.randint(-9, 9), r.randint(-9, 9)), lambda a, b: a * b),
    ("maximum", "a, b", "return max(a, b)", lambda r: (r.randint(-9, 9), r.randint(-9, 9)), max),
    ("square", "x", "return x * x", lambda r: (r.randint(-9, 9),), lambda x: x * x),
    ("negate", "x", "return -x", lambda r: (r.randint(-9, 9),), lambda x: -x),
    ("is_even", "x", "return x % 2 == 0", lambda r: (r.randint(0, 20),), lambda x: x % 2 == 0),
]


def code_samples(n: int, seed: int = 0) -> list[dict]:
    """`n` "write function f" tasks with three assert tests each.

    >>> s = code_samples(1)[0]
    >>> s["domain"], len(s["meta"]["tests"]), s["completion"].startswith(NO_THINK + "```python")
    ('code', 3, True)
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, args, body, draw, ref = rng.choice(_CODE)
        fn = f"{name}_{i}"
        tests = [f"assert {fn}({', '.join(map(str, x))}) == {ref(*x)!r}" for x in (draw(rng) for _ in range(3))]
        prompt = f"Write a Python function {fn}({args}) that computes {name.replace('_', ' ')}. Example: {tests[0][7:]}"
        code = f"def {fn}({args}):\n    {body}\n"
        out.append({"id": f"code-{seed}-{i}", "domain": "code", "prompt": prompt, "answer": None,
                    "completion": NO_THINK + f"```python\n{code}```", "meta": {"tests": tests}})
    return out


# Words the count tasks' file names are made of (`<word><1-99>.txt`); `agent_samples(names=k)` uses the first k.
_FILE_WORDS = ("data", "log", "notes", "items", "list", "words", "names", "rows", "todo", "tasks", "users", "files",
               "events", "cities", "colors", "scores", "errors", "orders", "books", "songs", "emails", "hosts",
               "ports", "keys", "dates", "prices", "jobs", "parts", "tags", "links", "stock", "plants")


def agent_samples(n: int, seed: int = 0, system: str | None = None, names: int = 4) -> list[dict]:
    """`n` sandbox tasks (write a value to a file, or count lines) with scripted SFT episodes: the tool call,
    then (`meta.followup`) the tool's observation and a final answer that ends the episode.

    `system` defaults to `sandbox.toolcall.tools_prompt()`; tiny models want a shorter one. `names` is how many
    words the count tasks' file names draw from (at most 32): with the default 4 a small model can learn a 4-way
    choice instead of copying the name from the prompt, and fail it on one word (docs/grpo.md, agent).

    >>> s = agent_samples(1, system="Use tools.")[0]
    >>> s["domain"], s["meta"]["task"]["check"]
    ('agent', 'test "$(cat answer.txt)" = 8')
    >>> [s["meta"]["task"]["prompt"].split()[4] for s in agent_samples(3, names=32)]
    ['notes34.txt', 'prices39.txt', 'cities65.txt']
    """
    from sandbox import toolcall

    if not 1 <= names <= len(_FILE_WORDS):
        raise ValueError(f"agent_samples: names={names} is not in 1..{len(_FILE_WORDS)}")
    rng = random.Random(seed)
    words = list(_FILE_WORDS[:names])
    system = toolcall.tools_prompt() if system is None else system
    out = []
    for i in range(n):
        if rng.random() < 0.5:
            v = rng.randint(10, 99)
            prompt, setup = f"Write {v} to answer.txt.", {}
            call = toolcall.format_call("write_file", path="answer.txt", content=str(v))
            observation = f"wrote {len(str(v))} bytes to answer.txt"
        else:
            v = rng.randint(2, 9)
            name = f"{rng.choice(words)}{rng.randint(1, 99)}.txt"  # distinct prompts
            prompt = f"Count the lines of {name} and write the count to answer.txt."
            setup = {"commands": [f"seq {v} > {name}"]}
            call = toolcall.format_call("bash", command=f"wc -l < {name} > answer.txt")
            observation = ""  # the command prints nothing
        # The check reads only the agent's answer.txt (its output, not a file we provide): no check files.
        task = {"name": f"agent-{seed}-{i}", "prompt": prompt, "setup": setup, "max_turns": 3, "timeout_s": 10.0,
                "check": f'test "$(cat answer.txt)" = {v}', "check_files": []}
        out.append({"id": task["name"], "domain": "agent", "answer": None, "completion": NO_THINK + call,
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                    "meta": {"task": task, "followup": [{"role": "tool", "content": observation},
                                                        {"role": "assistant", "content": NO_THINK + "Done."}]}})
    return out


def instruction_samples(n: int, seed: int = 0) -> list[dict]:
    """IF prompts with verifiable constraints (`rewards.if_data`), completions that meet them."""
    from rewards.if_data import if_samples

    return if_samples(n, seed=seed)
