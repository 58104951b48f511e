"""Running workflows for real: artifacts load in transformers, reruns skip, a SIGKILLed stage resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]

DATA = """{domain: math, source: reasoning_gym, task: basic_arithmetic, size: 300, heldout: 20,
             task_args: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, operators: ["+"],
                         allow_parentheses: false, allow_negation: false}}"""


BASE_STAGE = f"""
  base:
    kind: base_model
    config:
      tokenizer_data: [{DATA}]
      vocab_size: 300
      model: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, intermediate_size: 64}}"""


def tiny_workflow(name: str, sft_steps: int, save_every: int) -> str:
    return f"""
name: {name}
stages:{BASE_STAGE}
  sft:
    kind: sft
    needs: [base]
    config: {{model: base, data: {DATA}, steps: {sft_steps}, batch_size: 8, save_every: {save_every}}}
  eval:
    kind: eval
    needs: [base, sft]
    config: {{models: [base, sft], data: [{DATA}], limit: 8, max_new_tokens: 12}}
"""


def pipeline(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, text=True,
                          capture_output=True, timeout=600, **kw)


def steps_logged(stage_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def kill_after_checkpoint(wf: Path, runs: Path, stage_dir: Path, step: int) -> int:
    """Run `wf`, SIGKILL it once `stage_dir` holds checkpoint `step`; returns its newest complete checkpoint.

    The whole process group goes: the driver, its Ray and every actor of the stage, mid-step.
    """
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(wf), "--runs-dir", str(runs)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (stage_dir / "checkpoints" / f"step_{step}" / "COMPLETE").exists():
            assert proc.poll() is None and time.time() < deadline, f"{stage_dir.name} never reached checkpoint step_{step}"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (stage_dir / "DONE.json").exists()
    ckpts = (int(p.name.split("_")[1]) for p in (stage_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
    return max(ckpts)


def test_run_writes_loadable_artifacts_and_skips_finished_stages(tmp_path):
    wf = tmp_path / "wf.yaml"
    wf.write_text(tiny_workflow("artifacts", sft_steps=6, save_every=3))
    r = pipeline("run", wf, "--runs-dir", tmp_path / "runs")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "artifacts: base ran, sft ran, eval ran" in r.stdout
    out = tmp_path / "runs" / "artifacts"
    for stage in ("base", "sft", "eval"):
        assert (out / stage / "DONE.json").exists() and (out / stage / "config.yaml").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "sft" / "model")
    tok = AutoTokenizer.from_pretrained(out / "sft" / "model")
    assert (out / "sft" / "model" / "model.safetensors").exists()
    assert model.config.vocab_size == len(tok)
    assert steps_logged(out / "sft") == list(range(1, 7))
    scores = json.loads((out / "eval" / "eval.json").read_text())["scores"]["math"]
    assert set(scores) == {"base", "sft"}

    again = pipeline("run", wf, "--runs-dir", tmp_path / "runs")
    assert again.returncode == 0 and "base skipped, sft skipped, eval skipped" in again.stdout

    edited = wf.read_text().replace("limit: 8", "limit: 4")
    wf.write_text(edited)
    changed = pipeline("run", wf, "--runs-dir", tmp_path / "runs")
    assert changed.returncode == 2 and "rerun with --force" in changed.stderr
    forced = pipeline("run", wf, "--runs-dir", tmp_path / "runs", "--stage", "eval", "--force")
    assert forced.returncode == 0 and "eval ran" in forced.stdout


def test_sigkilled_stage_resumes_from_its_last_checkpoint(tmp_path):
    wf = tmp_path / "wf.yaml"
    wf.write_text(tiny_workflow("resume", sft_steps=400, save_every=20))
    runs = tmp_path / "runs"
    sft = runs / "resume" / "sft"
    resumed_from = kill_after_checkpoint(wf, runs, sft, 40)
    assert 40 <= resumed_from < 400 and max(steps_logged(sft)) >= resumed_from

    # Finish quickly: same run, fewer remaining steps would change the config, so run it as is.
    r = pipeline("run", wf, "--runs-dir", runs)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming sft from step_{resumed_from} (step {resumed_from} of 400)" in (sft / "stage.log").read_text()
    assert steps_logged(sft) == list(range(1, 401))  # the step count continues, nothing twice
    assert (sft / "DONE.json").exists() and (sft / "model" / "model.safetensors").exists()
