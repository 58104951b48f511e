"""A 2-worker SFT stage killed with SIGKILL resumes on 2 workers, and its checkpoint on 1 worker."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from tests.pipeline.test_run import BASE_STAGE, DATA, kill_after_checkpoint, pipeline, steps_logged


def workflow(workers: int) -> str:
    learner = f"{{workers: {workers}, cpus_per_worker: {1 / workers}}}"
    return f"""
name: resume_workers
stages:{BASE_STAGE}
  sft:
    kind: sft
    needs: [base]
    config: {{model: base, data: {DATA}, steps: 300, batch_size: 8, save_every: 10, learner: {learner}}}
"""


def test_sharded_checkpoints_resume_on_the_same_or_another_worker_count(tmp_path):
    wf, runs = tmp_path / "wf.yaml", tmp_path / "runs"
    sft = runs / "resume_workers" / "sft"
    wf.write_text(workflow(2))
    first = kill_after_checkpoint(wf, runs, sft, 20)
    assert 20 <= first < 300

    second = kill_after_checkpoint(wf, runs, sft, first + 20)  # 2 workers again, from 2 workers' shards
    log = (sft / "stage.log").read_text()
    assert f"resuming sft from step_{first} (step {first} of 300)" in log
    assert "sft: 2 worker(s), fsdp2" in log

    wf.write_text(workflow(1))  # the same stage on 1 worker: the config still matches, the shards reshard
    r = pipeline("run", wf, "--runs-dir", runs)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (sft / "stage.log").read_text()
    assert f"resuming sft from step_{second} (step {second} of 300)" in log and "sft: 1 worker(s), fsdp2" in log
    assert steps_logged(sft) == list(range(1, 301))  # the step count continues, nothing twice
    model = AutoModelForCausalLM.from_pretrained(sft / "model")
    assert model.config.vocab_size > 0
