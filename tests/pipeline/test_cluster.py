"""Workflows on a real two-node Ray cluster: each stage its own Ray job (submit) or task (run), and
independent stages side by side."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.pipeline.test_run import BASE_STAGE, DATA, REPO, steps_logged, tiny_workflow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """`ray start --head` plus a second `ray start --address` node with its own resources (1 CPU each)."""
    temp = Path(f"/tmp/rt{os.getpid()}")  # short: Ray's unix sockets live under it
    gcs, dash = free_port(), free_port()
    # Ray >= 2.5x turns on token auth for `ray start --head`; a loopback test cluster opts out.
    # The cluster's `python` (what a Ray job's entrypoint runs) is this interpreter, as on a real
    # cluster whose nodes run the environment the pipeline is installed in (a virtualenv in CI).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    # Every node's dashboard agent gets its own port: the default (52365) is taken by any other
    # Ray on this machine, e.g. the suite's embedded one, and then no agent accepts jobs.
    subprocess.run([*ray, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=1",
                    f"--dashboard-agent-listen-port={free_port()}",
                    "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        subprocess.run([*ray, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                        f"--dashboard-agent-listen-port={free_port()}",
                        '--resources={"second_node": 1}', "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", env
    finally:
        # `ray stop` would stop every Ray on the machine; stop only this cluster's processes.
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if str(temp) in cmd or f"127.0.0.1:{gcs}" in cmd or f"--gcs-address=127.0.0.1:{gcs}" in cmd:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
        shutil.rmtree(temp, ignore_errors=True)


def submit(workflow: str, dashboard: str, runs: Path, env: dict) -> subprocess.CompletedProcess:
    """`pipeline submit` of `workflow` (text), written for the run inside the uploaded working dir."""
    wf = REPO / f"submit_test_{os.getpid()}.yaml"  # must sit in the uploaded working dir, not a git-ignored one
    wf.write_text(workflow)
    try:
        return subprocess.run([sys.executable, "-m", "pipeline", "submit", str(wf.relative_to(REPO)), "--address",
                               dashboard, "--runs-dir", str(runs)], cwd=REPO, capture_output=True, text=True,
                              timeout=600, env=env)
    finally:
        wf.unlink()


def test_submit_runs_each_stage_as_a_ray_job_on_two_nodes(two_node_cluster, tmp_path):
    dashboard, gcs, env = two_node_cluster
    nodes = subprocess.run([sys.executable, "-c", f"import ray; ray.init('{gcs}'); print(len([n for n in ray.nodes() if n['Alive']]))"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]

    runs = tmp_path / "runs"
    r = submit(tiny_workflow("cluster", sft_steps=4, save_every=2), dashboard, runs, env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for stage in ("base", "sft", "eval"):
        assert f"[{stage}] submitted as cluster-{stage}-" in r.stdout
        assert f"[{stage}] SUCCEEDED" in r.stdout
        assert (runs / "cluster" / stage / "DONE.json").exists()
    assert steps_logged(runs / "cluster" / "sft") == [1, 2, 3, 4]
    assert "math" in json.loads((runs / "cluster" / "eval" / "eval.json").read_text())["scores"]
    assert f"report: {runs.resolve() / 'cluster' / 'report.html'}" in r.stdout  # the submitting driver writes it


def test_submit_to_a_dead_address_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "submit", "workflows/quickstart.yaml",
                        "--address", f"http://127.0.0.1:{free_port()}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: --address http://127.0.0.1:") and "Traceback" not in r.stderr


def two_experts(name: str, bad: Path | None = None) -> str:
    """base -> sft_a, sft_b (independent, 1 CPU each) -> eval of both; `bad`: sft_b's model, a directory
    that passes validation (it has a config.json) but holds no tokenizer, so sft_b fails once it runs."""
    sft = "{{model: {model}, data: {data}, steps: 12, batch_size: 8}}"
    return f"""
name: {name}
stages:{BASE_STAGE}
  sft_a:
    kind: sft
    needs: [base]
    config: {sft.format(model="base", data=DATA)}
  sft_b:
    kind: sft
    needs: [base]
    config: {sft.format(model=bad or "base", data=DATA)}
  eval:
    kind: eval
    needs: [sft_a, sft_b]
    config: {{models: [sft_a, sft_b], data: [{DATA}], limit: 4, max_new_tokens: 8}}
"""


def interval(stage_dir: Path) -> tuple[float, float]:
    done = json.loads((stage_dir / "DONE.json").read_text())
    return done["started"], done["ended"]


def assert_side_by_side(top: Path) -> None:
    (a0, a1), (b0, b1), (e0, _) = interval(top / "sft_a"), interval(top / "sft_b"), interval(top / "eval")
    assert a0 < b1 and b0 < a1, f"sft_a {a0:.1f}-{a1:.1f} and sft_b {b0:.1f}-{b1:.1f} did not overlap"
    assert e0 >= max(a1, b1), "eval started before both experts finished"


def test_run_starts_independent_stages_together_on_two_nodes(two_node_cluster, tmp_path):
    _, gcs, env = two_node_cluster
    wf = tmp_path / "wf.yaml"
    wf.write_text(two_experts("parallel_run"))
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(wf), "--address", gcs, "--runs-dir",
                        str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "parallel_run: base ran, sft_a ran, sft_b ran, eval ran" in r.stdout
    top = tmp_path / "runs" / "parallel_run"
    assert_side_by_side(top)
    for stage in ("sft_a", "sft_b"):  # each driver wrote its own log
        log = (top / stage / "stage.log").read_text()
        assert f"stage {stage} (sft): starting" in log and f"sft {stage}: 91 rows, 12 steps" in log


def test_submit_runs_independent_stages_as_concurrent_jobs(two_node_cluster, tmp_path):
    dashboard, _, env = two_node_cluster
    runs = tmp_path / "runs"
    r = submit(two_experts("parallel_submit"), dashboard, runs, env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert_side_by_side(runs / "parallel_submit")
    assert r.stdout.index("[sft_b] submitted") < r.stdout.index("[sft_a] SUCCEEDED")  # two jobs at once


def test_a_failed_stage_starts_nothing_new_and_lets_the_running_one_finish(tmp_path):
    wf = tmp_path / "wf.yaml"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "qwen2"}')
    wf.write_text(two_experts("failing", bad=tmp_path / "broken"))
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(wf), "--runs-dir", str(tmp_path / "runs")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    top = tmp_path / "runs" / "failing"
    assert r.returncode == 1, (r.stdout + r.stderr)[-4000:]  # a stage that crashed, not a bad workflow (2)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage 'sft_b' (sft): ") and last.endswith(f"log: {top / 'sft_b' / 'stage.log'}")
    assert "Traceback" in (top / "sft_b" / "stage.log").read_text()  # the whole story is in the stage's log
    assert (top / "sft_a" / "DONE.json").exists()  # started beside sft_b, and finished
    assert not (top / "sft_b" / "DONE.json").exists() and not (top / "eval").exists()


SERVICES = """
import json, subprocess, sys
import ray
from sandbox.service import ServiceConfig, node_pool, service_metrics, start_services, stop_services

ray.init(sys.argv[1])
actors = start_services(ServiceConfig(size=1))

@ray.remote(num_cpus=0)
def on(node):
    pool, owned = node_pool(size=3)  # a worker's view: its own node's service, not a private pool
    info = ray.get(pool.actors[0].info.remote())
    with pool.session() as s:
        s.write_file("x.txt", "kept")
        out = s.exec("cat x.txt").stdout
    return {"owned": owned, "service_node": info["node"], "task_node": ray.get_runtime_context().get_node_id(),
            "run": pool.run("print(6 * 7)").stdout.strip(), "session": out, "containers": info["containers"]}

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
seen = ray.get([on.options(scheduling_strategy=On(n, soft=False)).remote(n) for n in actors])
metrics = service_metrics()
stopped = stop_services()
names = [c for r in seen for c in r["containers"]]
left = subprocess.run(["docker", "ps", "-aq", *[f"--filter=name={n}" for n in names]], capture_output=True, text=True).stdout.split()
print(json.dumps({"seen": seen, "metrics": metrics, "stopped": stopped, "left": left}))
"""


def test_each_node_serves_its_own_sandboxes_and_stopping_leaves_no_container(two_node_cluster):
    _, gcs, env = two_node_cluster
    r = subprocess.run([sys.executable, "-c", SERVICES, gcs], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["seen"]) == 2 and out["stopped"] == 2
    for s in out["seen"]:
        assert not s["owned"] and s["service_node"] == s["task_node"]  # the caller's own node's service
        assert s["run"] == "42" and s["session"] == "kept"
    assert {s["service_node"] for s in out["seen"]} == {s["task_node"] for s in out["seen"]}  # two nodes, two services
    assert out["metrics"]["sandbox/live_sessions"] == 0 and out["metrics"]["sandbox/restarts"] == 0
    assert out["left"] == []  # every service's containers destroyed with it


AGENT = '{domain: agent, source: generator, task: "experts.tasks:agent_samples", size: 40, heldout: 4, task_args: {system: "Use tools."}}'


def served(name: str) -> str:
    """A workflow with a `sandbox:` block and a tiny base model for agent tasks; stages follow."""
    return f"""
name: {name}
sandbox: {{size: 2, limits: {{memory_mb: 256}}}}
stages:
  base:
    kind: base_model
    config: {{tokenizer_data: [{AGENT}], vocab_size: 400,
              model: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, intermediate_size: 64}}}}"""


def test_a_workflow_with_a_sandbox_block_runs_its_agent_eval_on_the_node_service(tmp_path):
    wf = tmp_path / "wf.yaml"
    wf.write_text(served("served") + f"""
  eval:
    kind: eval
    needs: [base]
    config: {{models: [base], data: [{AGENT}], limit: 4, max_new_tokens: 8}}
""")
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(wf), "--runs-dir", str(tmp_path / "runs")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "sandbox services: 1 node(s), 2 container(s) each" in r.stderr
    scores = json.loads((tmp_path / "runs" / "served" / "eval" / "eval.json").read_text())["scores"]
    assert set(scores["agent"]) == {"base"}

    bad = wf.read_text().replace("memory_mb: 256", "memory_mb: 1")
    wf.write_text(bad)
    r = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(wf)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "sandbox.limits.memory_mb" in r.stderr and "Traceback" not in r.stderr


KILL_A_SERVICE = """
import json, os, sys, time
import ray
from sandbox.service import NAMESPACE, service_name

ray.init(sys.argv[1], log_to_driver=False)
metrics = sys.argv[2]
deadline = time.time() + 400
while time.time() < deadline:  # the stage is under way: its first step is logged
    try:
        if open(metrics).read().count("\\n") >= 1:
            break
    except FileNotFoundError:
        pass
    time.sleep(0.2)
print(json.dumps({"killing_after_step": open(metrics).read().count("\\n")}), flush=True)
pid = lambda a: ray.get(a.__ray_call__.remote(lambda self: os.getpid()))
services = {n["NodeID"]: ray.get_actor(service_name(n["NodeID"]), namespace=NAMESPACE) for n in ray.nodes() if n["Alive"]}
pids = [pid(a) for a in services.values()]
node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "second_node" in n["Resources"])
killed = pid(services[node])
ray.kill(services[node], no_restart=False)  # as a node's OOM killer would: Ray restarts it
while time.time() < deadline:  # the restarted one (ray.kill returns before the process is gone)
    try:
        if pid(services[node]) != killed:
            break
    except ray.exceptions.RayActorError:
        pass
    time.sleep(0.5)
pids.append(pid(services[node]))
print(json.dumps({"pids": pids}))
"""


STEPS = 8  # the kill lands after step 1; the steps after it leave the restart time to happen mid-stage


def test_agent_grpo_on_both_nodes_survives_a_killed_sandbox_service(two_node_cluster, tmp_path):
    """Rollout workers on both nodes take sessions from their node's service; one service is killed
    mid-stage, Ray restarts it, and the stage finishes every step with nothing left behind."""
    _, gcs, env = two_node_cluster
    wf = tmp_path / "wf.yaml"
    wf.write_text(served("served_grpo") + f"""
  grpo:
    kind: grpo
    needs: [base]
    config:
      model: base
      data: {AGENT}
      rewards: {{weights: {{agent: 1.0}}}}
      steps: {STEPS}
      prompts_per_step: 2
      dynamic_sampling: false
      reward_workers: 0
      learner: {{cpus_per_worker: 0.5}}
      rollout: {{group_size: 2, max_new_tokens: 24, reasoning: non_think, num_workers: 2, num_cpus: 0.25, placement: spread}}
      agent: {{max_turns: 2, sandboxes: 2}}
""")
    metrics = tmp_path / "runs" / "served_grpo" / "grpo" / "metrics.jsonl"
    killer = subprocess.Popen([sys.executable, "-c", KILL_A_SERVICE, gcs, str(metrics)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(wf), "--address", gcs, "--runs-dir",
                            str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    finally:
        try:  # the killer waits for the restarted service; once the run is over it has had its time
            out, err = killer.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            killer.kill()
            out, err = killer.communicate()
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert killer.returncode == 0, f"the killer printed {out!r}; {err[-2000:]}"
    pids = json.loads(out.strip().splitlines()[-1])["pids"]
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))  # no step lost
    assert all(m["agent/turns_mean"] >= 1 for m in steps)  # every step's episodes ran
    assert steps[-1]["sandbox/restarts"] >= 1  # the killed service came back
    # nothing left behind: neither the killed service's containers nor the two services' after the run
    left = [c for p in pids for c in subprocess.run(["docker", "ps", "-aq", f"--filter=label=opd.sandbox.pid={p}"],
                                                     capture_output=True, text=True).stdout.split()]
    assert len(set(pids)) == 3 and left == []
