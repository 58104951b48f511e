"""A workflow submitted to a real two-node Ray cluster runs each stage as its own Ray job."""

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

from tests.pipeline.test_run import REPO, steps_logged, tiny_workflow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster(tmp_path_factory):
    """`ray start --head` plus a second `ray start --address` node with its own resources."""
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


def test_submit_runs_each_stage_as_a_ray_job_on_two_nodes(two_node_cluster, tmp_path):
    dashboard, gcs, env = two_node_cluster
    nodes = subprocess.run([sys.executable, "-c", f"import ray; ray.init('{gcs}'); print(len([n for n in ray.nodes() if n['Alive']]))"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]

    wf = REPO / f"cluster_test_{os.getpid()}.yaml"  # must sit in the uploaded working dir, not a git-ignored one
    wf.write_text(tiny_workflow("cluster", sft_steps=4, save_every=2))
    runs = tmp_path / "runs"
    try:
        r = subprocess.run([sys.executable, "-m", "pipeline", "submit", str(wf.relative_to(REPO)), "--address", dashboard,
                            "--runs-dir", str(runs)], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    finally:
        wf.unlink()
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for stage in ("base", "sft", "eval"):
        assert f"[{stage}] submitted as cluster-{stage}-" in r.stdout
        assert f"[{stage}] SUCCEEDED" in r.stdout
        assert (runs / "cluster" / stage / "DONE.json").exists()
    assert steps_logged(runs / "cluster" / "sft") == [1, 2, 3, 4]
    assert "math" in json.loads((runs / "cluster" / "eval" / "eval.json").read_text())["scores"]


def test_submit_to_a_dead_address_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "submit", "workflows/quickstart.yaml",
                        "--address", f"http://127.0.0.1:{free_port()}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: --address http://127.0.0.1:") and "Traceback" not in r.stderr
