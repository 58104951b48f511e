"""The pool through a real Ray actor: shared by workers, and a session outlives a worker that dies."""

import os
import subprocess
from pathlib import Path

import pytest
import ray

from sandbox import Limits
from sandbox.actor import RemotePool, serve_pool
from sandbox.episode import ScriptedPolicy, load_task, run_episode

TASKS = Path(__file__).resolve().parents[2] / "sandbox" / "tasks"


@pytest.fixture(scope="module")
def ray_pool(ray_session):
    actor = serve_pool(size=2, limits=Limits(memory_mb=256, pids=64, timeout_s=5.0), name="test-sandbox-pool")
    yield actor
    names = ray.get(actor.info.remote())["containers"]
    ray.get(actor.close.remote())
    ray.kill(actor)
    live = subprocess.run(["docker", "ps", "-aq", "--filter", "label=opd.sandbox"], capture_output=True, text=True)
    assert not set(names) & set(live.stdout.split())


def test_workers_share_the_actor_and_a_dead_workers_session_resumes(ray_pool, tmp_path):
    # Workers elsewhere find the pool by name.
    @ray.remote(num_cpus=0)
    def square(i):
        return RemotePool(ray.get_actor("test-sandbox-pool")).run(f"print({i} ** 2)").stdout

    assert ray.get([square.remote(i) for i in range(6)]) == [f"{i * i}\n" for i in range(6)]

    log = tmp_path / "episode.jsonl"

    @ray.remote(num_cpus=0, max_retries=0)
    def worker_that_dies(path):
        s = RemotePool(ray.get_actor("test-sandbox-pool")).session(trajectory=path)
        s.exec("echo step >> progress")
        os._exit(1)  # the rollout worker crashes mid-episode

    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(worker_that_dies.remote(str(log)))
    s = RemotePool(ray_pool).session(trajectory=log)
    assert s.exec("echo step >> progress").exit_code == 0  # replayed from the log, not re-run
    assert s.exec("wc -l < progress").stdout.strip() == "1"
    s.close()


def test_an_episode_runs_through_the_actor(ray_pool):
    task = load_task(TASKS / "fix_bug.yaml")
    ep = run_episode(task, ScriptedPolicy(task.scripted_turns), RemotePool(ray_pool))
    assert ep["reward"] == 1.0
