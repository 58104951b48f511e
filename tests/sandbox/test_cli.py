"""The CLI as a shell user meets it: exit codes, one-line errors, episodes that write transcripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TASKS = Path(__file__).resolve().parents[2] / "sandbox" / "tasks"


def sandbox(*args, stdin="", env=None):
    return subprocess.run([sys.executable, "-m", "sandbox", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_run_passes_through_output_and_exit_code(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(7)\n")
    r = sandbox("run", str(prog))
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert sandbox("run", "-c", "print(6 * 7)").stdout == "42\n"


def test_a_timeout_exits_124_with_a_message():
    r = sandbox("run", "--timeout", "1", "-c", "while True: pass")
    assert r.returncode == 124 and "timed out after 1s" in r.stderr


def test_shell_keeps_state_across_lines():
    r = sandbox("shell", stdin="mkdir d && cd d && echo hi > a.txt\ncat a.txt\npwd\nfalse\n")
    assert r.returncode == 1 and r.stdout == "hi\n/work/d\n"  # exit status of the last line


@pytest.mark.parametrize("args, env, message", [
    (["run", "missing.py"], None, "sandbox: error: missing.py: no such file"),
    (["episode", "missing.yaml"], None, "sandbox: error: missing.yaml: no such file"),
    (["run", "-c", "1"], {"DOCKER_HOST": "unix:///tmp/dead.sock"}, "cannot reach the Docker daemon at unix:///tmp/dead.sock"),
])
def test_bad_input_is_a_one_line_error_without_traceback(args, env, message):
    r = sandbox(*args, env=env)
    assert r.returncode == 1 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_bad_task_field_is_named(tmp_path):
    bad = tmp_path / "task.yaml"
    bad.write_text("name: t\nprompt: p\ncheck: 'true'\nsetup:\n  filez: {}\n")
    r = sandbox("episode", str(bad))
    assert r.returncode == 1 and f"{bad}: field setup.filez: Extra inputs are not permitted" in r.stderr


@pytest.mark.parametrize("task", sorted(p.name for p in TASKS.glob("*.yaml")))
def test_every_shipped_task_is_solved_by_its_scripted_policy(task, tmp_path):
    out = tmp_path / "t.jsonl"
    r = sandbox("episode", str(TASKS / task), "--policy", "scripted", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[-1]["type"] == "reward" and lines[-1]["reward"] == 1.0
    roles = [m["role"] for m in lines[:-1]]
    assert roles[:2] == ["system", "user"] and "tool" in roles
    tool_msgs = [m["content"] for m in lines if m.get("role") == "tool"]
    assert tool_msgs and not any("<|tool_result|>" in c for c in tool_msgs)  # bare: the template adds markers


def test_ps_and_gc_run():
    assert sandbox("ps").stdout.startswith("NAME")
    assert sandbox("gc").stdout.startswith("removed ")


@pytest.mark.parametrize("value", ["inf", "-1", "nan", "0"])
def test_a_bad_timeout_is_one_line_naming_it_and_exit_2(value):
    r = sandbox("run", "--timeout", value, "-c", "print(1)")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"sandbox: error: --timeout {value} is not allowed: "
                                             "give a number of seconds in (0, 3600]"]
    assert sandbox("run", "-c", "print(1)").stdout == "1\n"
