"""A GRPO stage killed with SIGKILL mid-run resumes from its last checkpoint and continues the step count."""

from __future__ import annotations

import json

from tests.pipeline.test_run import BASE_STAGE, DATA, kill_after_checkpoint, pipeline, steps_logged

WORKFLOW = f"""
name: grpo_resume
stages:{BASE_STAGE}
  sft:
    kind: sft
    needs: [base]
    config: {{model: base, data: {DATA}, steps: 40, batch_size: 16, lr: 3.0e-3, save_every: 40}}
  grpo:
    kind: grpo
    needs: [sft]
    config:
      model: sft
      data: {DATA}
      rewards: {{weights: {{math: 1.0}}}}
      rollout: {{group_size: 4, max_new_tokens: 8}}
      steps: 60
      prompts_per_step: 4
      lr: 1.0e-4
      kl_coef: 0.01
      save_every: 5
"""


def test_sigkilled_grpo_stage_resumes_and_continues_the_step_count(tmp_path):
    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW)
    runs = tmp_path / "runs"
    grpo = runs / "grpo_resume" / "grpo"
    resumed_from = kill_after_checkpoint(wf, runs, grpo, 10)
    assert 10 <= resumed_from < 60 and max(steps_logged(grpo)) >= resumed_from

    r = pipeline("run", wf, "--runs-dir", runs)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "base skipped, sft skipped, grpo ran" in r.stdout
    assert f"resuming grpo from step_{resumed_from} (step {resumed_from} of 60)" in (grpo / "stage.log").read_text()
    assert steps_logged(grpo) == list(range(1, 61))  # the step count continues, nothing logged twice
    rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert rows[resumed_from]["sync/probe_logp_gap"] < 1e-4  # rollout workers restarted on the resumed weights
    assert (grpo / "DONE.json").exists() and (grpo / "model" / "model.safetensors").exists()
