"""An agent episode scores 1 when the task's check passes in its sandbox session, 0 when it does not."""

from pathlib import Path

import pytest

from rewards.agent import AgentReward
from sandbox.episode import ScriptedPolicy, load_task, run_episode
from sandbox.toolcall import format_call

TASK = str(Path(__file__).resolve().parents[2] / "sandbox" / "tasks" / "count_words.yaml")


def test_replayed_turns_solve_or_fail_the_task(pool):
    task = load_task(TASK)
    wrong = "Let me guess.\n" + format_call("bash", command="echo 7 > count.txt")
    garbled = '<|tool_call|><invoke name="bash"><parameter name="command">echo 9 > count.txt<|/tool_call|>'
    samples = [
        {"id": "solved", "completion": "", "meta": {"task": TASK, "turns": task.scripted_turns}},
        {"id": "wrong", "completion": wrong, "meta": {"task": task.model_dump()}},
        {"id": "garbled", "completion": garbled, "meta": {"task": TASK}},
    ]
    results = AgentReward(pool=pool, parse_error_penalty=0.25)(samples)
    assert [r.score for r in results] == [1.0, 0.0, -0.25]
    assert results[1].reason == "check failed (exit code 1)"
    assert results[2].details["parse_errors"] == 1


def test_a_rolled_out_episode_is_scored_without_running_again(pool):
    task = load_task(TASK)
    episode = run_episode(task, ScriptedPolicy(task.scripted_turns), pool)
    [r] = AgentReward(step_penalty=0.05)([{"completion": "", "meta": {"episode": episode}}])
    assert r.score == pytest.approx(1.0 - 0.05 * episode["turns"]) and r.details["solved"] == 1.0


def test_replayed_turns_that_rewrite_the_test_score_zero(pool):
    fix_bug = str(Path(TASK).with_name("fix_bug.yaml"))
    cheat = format_call("bash", command="echo 'print(\"ok\")' > test_stats.py")
    [r] = AgentReward(pool=pool)([{"id": "cheat", "completion": cheat, "meta": {"task": fix_bug}}])
    assert r.score == 0.0 and r.reason == "check failed (exit code 1)"
