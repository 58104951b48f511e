"""A GRPO stage with `learner: {workers: 2, placement: spread}` trains on a real two-node Ray cluster,
one learner rank per node; a spread group larger than the cluster fails at once with one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from transformers import AutoModelForCausalLM

from tests.pipeline.test_cluster import two_node_cluster  # noqa: F401 -- the fixture
from tests.pipeline.test_run import BASE_STAGE, DATA, REPO


def workflow(learner: str, with_sft: bool) -> str:
    """base (-> sft) -> grpo. Each test node has 1 CPU: the learner takes 2 x 0.5 (one per node), the
    rollout actor 0.25, rewards are scored in the driver (reward_workers 0) and kl_coef 0 starts no
    reference group, so the stage needs 1.25 of the cluster's 2 CPUs."""
    sft = f"""
  sft:
    kind: sft
    needs: [base]
    config: {{model: base, data: {DATA}, steps: 4, batch_size: 8, save_every: 4}}""" if with_sft else ""
    start = "sft" if with_sft else "base"
    # dynamic_sampling and overlong filtering off: every rollout trains, so each step runs a real
    # two-rank update (gradient reduce-scatter across the nodes), not a skipped one.
    return f"""
name: spread
stages:{BASE_STAGE}{sft}
  grpo:
    kind: grpo
    needs: [{start}]
    config:
      model: {start}
      data: {DATA}
      rewards: {{weights: {{math: 1.0}}}}
      rollout: {{group_size: 2, max_new_tokens: 6, num_cpus: 0.25}}
      steps: 2
      prompts_per_step: 2
      lr: 1.0e-4
      kl_coef: 0.0
      dynamic_sampling: false
      overlong: none
      save_every: 2
      reward_workers: 0
      learner: {learner}
"""


def run_on(gcs: str, env: dict, wf, runs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(wf), "--address", gcs, "--runs-dir", str(runs)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_grpo_learner_spread_over_two_nodes_puts_one_rank_on_each(two_node_cluster, tmp_path):  # noqa: F811
    _, gcs, env = two_node_cluster
    wf = tmp_path / "spread.yaml"  # `run` reads the file here; only `submit` uploads a working dir
    wf.write_text(workflow("{workers: 2, cpus_per_worker: 0.5, placement: spread}", with_sft=True))
    runs = tmp_path / "runs"
    r = run_on(gcs, env, wf, runs)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "spread: base ran, sft ran, grpo ran" in r.stdout

    grpo = runs / "spread" / "grpo"
    assert (grpo / "DONE.json").exists()
    AutoModelForCausalLM.from_pretrained(grpo / "model")  # the gathered HF checkpoint loads
    rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2] and all(m["updates"] == 1 for m in rows)

    line = next(ln for ln in (grpo / "stage.log").read_text().splitlines() if "grpo learner: 2 worker(s)" in ln)
    ranks = dict(re.findall(r"rank (\d+) on \S+ node ([0-9a-f]{8}) \(pid \d+\)", line))
    assert set(ranks) == {"0", "1"}, line
    assert ranks["0"] != ranks["1"], f"both learner ranks on one node: {line}"


def test_a_spread_learner_with_more_workers_than_nodes_fails_at_once(two_node_cluster, tmp_path):  # noqa: F811
    _, gcs, env = two_node_cluster
    wf = tmp_path / "spread3.yaml"
    wf.write_text(workflow("{workers: 3, cpus_per_worker: 0.5, placement: spread}", with_sft=False))
    t0 = time.monotonic()
    r = run_on(gcs, env, wf, tmp_path / "runs")
    assert r.returncode == 2, (r.stdout + r.stderr)[-4000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: stage 'grpo' (grpo): grpo learner: learner placement 'spread' puts one worker per node: "
        f"3 workers, but the cluster has 2 node(s); log: {tmp_path / 'runs' / 'spread' / 'grpo' / 'stage.log'}")
    assert "Traceback" not in r.stderr
    # 1.5 CPUs would fit the cluster's 2: the node count is checked before any placement group waits.
    assert time.monotonic() - t0 < 90
    assert not (tmp_path / "runs" / "spread" / "grpo" / "DONE.json").exists()
