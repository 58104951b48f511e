"""The episode stepper both loops drive (`sandbox episode` and GRPO rollouts), in a real sandbox."""

import pytest

from sandbox.container import SandboxError
from sandbox.episode import Episode, ScriptedPolicy, Task, TaskError, run_episode
from sandbox.toolcall import format_call

TASK = Task(name="touch", prompt="Create done.txt.", check="test -e done.txt", max_turns=3,
            setup={"files": {"notes.txt": "hello\n"}, "commands": ["test -e notes.txt"]})


def test_a_failed_setup_command_names_it_and_releases_the_session(pool, tmp_path):
    task = TASK.model_copy(update={"setup": TASK.setup.model_copy(update={"commands": ["exit 3"]})})
    traj = tmp_path / "traj.jsonl"
    with pytest.raises(TaskError, match=r"task touch: setup command 'exit 3' failed: \[exit code 3\]"):
        run_episode(task, ScriptedPolicy([]), pool, trajectory=traj)
    with pytest.raises(SandboxError, match="that episode already finished"):  # closed, not left holding a container
        pool.session(trajectory=traj)


def test_a_stepped_episode_cuts_long_output_stops_at_its_turn_cap_and_is_checked(pool):
    ep = Episode(TASK, max_turns=2, max_observation_chars=20)
    ep.open(pool)
    try:
        obs = ep.step(format_call("bash", command="cat notes.txt; seq 1000"))
        assert obs == "hello\n1\n2\n3\n4\n5\n6\n7\n\n[output cut at 20 characters]" and not ep.done
        assert ep.step(format_call("bash", command="touch done.txt")) == "" and ep.done  # the cap: 2 < task's 3
        assert ep.finish().ok
    finally:
        ep.close()
    r = ep.result()
    assert r["reward"] == 1.0 and r["turns"] == 2 and r["check"]["ok"]
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant", "tool", "assistant", "tool"]


def test_a_turn_cut_off_mid_way_is_recorded_but_not_run(pool):
    ep = Episode(TASK)
    ep.open(pool)
    try:
        assert ep.step(format_call("bash", command="touch done.txt"), cut=True) is None and ep.done
        assert not ep.finish().ok
    finally:
        ep.close()
    assert ep.result()["reward"] == 0.0 and ep.messages[-1]["role"] == "assistant"
