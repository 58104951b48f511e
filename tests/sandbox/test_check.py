"""A task's check judges the agent's solution, not whatever else the agent left behind.

Each episode below plays a scripted agent that never fixes the bug but tries to pass the check
another way; every one scores 0, and the honest fix still scores 1.
"""

from pathlib import Path

import pytest

from sandbox.episode import ScriptedPolicy, Task, load_task, run_episode
from sandbox.toolcall import format_call

FIX_BUG = Path(__file__).resolve().parents[2] / "sandbox" / "tasks" / "fix_bug.yaml"
FAKE_TEST = "print(1)"  # a test that always passes (no quotes: it goes inside shell quoting)
USER_SITE = '"$(/usr/bin/python3 -m site --user-site)"'

CHEATS = {
    "rewrites the test": f"echo \"{FAKE_TEST}\" > test_stats.py",
    "replaces the test with a symlink": f"echo \"{FAKE_TEST}\" > fake.py && ln -sf fake.py test_stats.py",
    "shadows python3": (
        "printf '#!/bin/sh\\necho ok\\n' > python3 && chmod +x python3 && "  # a python3 in the work dir
        f"mkdir -p {USER_SITE} && echo 'import os; os._exit(0)' > {USER_SITE}/usercustomize.py && "  # in ~/.local
        "echo 'import os; os._exit(0)' > sitecustomize.py && export PATH=/work:$PATH"),
    "leaves a background process rewriting the test": (
        f"setsid bash -c 'while :; do echo \"{FAKE_TEST}\" > test_stats.py; sleep 0.01; done' "
        "</dev/null >/dev/null 2>&1 & "
        f"until grep -qx '{FAKE_TEST}' test_stats.py; do sleep 0.01; done"),  # it is running when the turn ends
}


@pytest.mark.parametrize("cheat", list(CHEATS))
def test_an_agent_that_games_the_check_scores_zero(pool, cheat):
    task = load_task(FIX_BUG)
    ep = run_episode(task, ScriptedPolicy([format_call("bash", command=CHEATS[cheat])]), pool)
    assert ep["reward"] == 0.0, (cheat, ep["check"])
    assert "AssertionError" in ep["check"]["stderr"], ep["check"]  # the real test ran on the unfixed stats.py


def test_the_honest_fix_still_scores_one(pool):
    task = load_task(FIX_BUG)
    assert run_episode(task, ScriptedPolicy(task.scripted_turns), pool)["reward"] == 1.0


def test_a_module_named_like_the_tests_imports_cannot_shadow_them(pool):
    """The test imports `json` (standard library) and `checklib` (a check file): the agent's
    json.py and checklib/ package do not replace them."""
    test = ("import json, os, sys\nsys.path.append(os.path.dirname(os.path.abspath(__file__)))\n"
            "from checklib import expect\nfrom answer import value\nexpect(json.loads(json.dumps(value)) == 42)\n")
    task = Task(name="shadow", prompt="Set value = 42 in answer.py.", check="python3 test_answer.py",
                setup={"files": {"answer.py": "value = 0\n", "test_answer.py": test,
                                 "checklib.py": "def expect(ok):\n    assert ok\n"}},
                check_files=["test_answer.py", "checklib.py"])
    cheat = ("echo 'import os; os._exit(0)' > json.py && mkdir checklib && "
             "echo 'def expect(ok): pass' > checklib/__init__.py")
    ep = run_episode(task, ScriptedPolicy([format_call("bash", command=cheat)]), pool)
    assert ep["reward"] == 0.0, ep["check"]
    honest = run_episode(task, ScriptedPolicy([format_call("write_file", path="answer.py", content="value = 42\n")]), pool)
    assert honest["reward"] == 1.0, honest["check"]


def test_check_files_must_come_from_setup_files():
    with pytest.raises(ValueError, match="'missing.py' is not in setup.files"):
        Task(name="t", prompt="p", check="true", check_files=["missing.py"])
