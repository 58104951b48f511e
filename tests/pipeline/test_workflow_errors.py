"""Every user mistake in a workflow file is one line naming the file, the field and the value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import UserError, load_workflow

REPO = Path(__file__).resolve().parents[2]

GOOD = """
name: t
stages:
  base: {kind: base_model, config: {vocab_size: 300}}
  sft: {kind: sft, needs: [base], config: {model: base, steps: 5}}
"""


def error_of(tmp_path: Path, text: str | bytes) -> str:
    f = tmp_path / "wf.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError) as e:
        load_workflow(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(f)), msg
    return msg


def test_every_shipped_workflow_validates():
    files = sorted((REPO / "workflows").glob("*.yaml"))
    assert files
    for f in files:
        wf = load_workflow(f)
        assert wf.stages, f


def test_good_workflow_orders_stages(tmp_path):
    f = tmp_path / "wf.yaml"
    f.write_text(GOOD.replace("  base:", "  zz_unused: {kind: base_model}\n  base:"))
    wf = load_workflow(f)
    assert list(wf.stages).index("base") < list(wf.stages).index("sft")


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("kind: sft", "kind: sfft"), "stages.sft.kind: unknown kind 'sfft' (did you mean 'sft'?)"),
        (GOOD.replace("steps: 5", "stepz: 5"), "stages.sft.config.stepz: unknown field (did you mean 'steps'?)"),
        (GOOD.replace("steps: 5", "steps: many"), "stages.sft.config.steps: Input should be a valid integer"),
        (GOOD.replace("steps: 5", "steps: 5, data: {sourc: jsonl}"), "stages.sft.config.data.0.sourc: unknown field (did you mean 'source'?)"),
        (GOOD.replace("steps: 5", "steps: -1"), "stages.sft.config.steps: Input should be greater than or equal to 1, got -1"),
        (GOOD.replace("needs: [base]", "needs: [bsae]"), "stages.sft.needs: no stage named 'bsae' (did you mean 'base'?)"),
        (GOOD.replace("config: {vocab_size: 300}", "needs: [sft], config: {vocab_size: 300}"), "dependency cycle"),
        (GOOD.replace("needs: [base], ", ""), "stages.sft.config.model: uses stage 'base', so add it to stages.sft.needs"),
        (GOOD.replace("model: base", "model: /no/such/ckpt"), "stages.sft.config.model: '/no/such/ckpt' does not exist"),
        (GOOD.replace("steps: 5", "steps: 5, data: {source: jsonl, path: missing.jsonl}"),
         "stages.sft.config.data.0.path: 'missing.jsonl' does not exist"),
        (GOOD.replace("steps: 5", "steps: 5, data: {source: jsonl}"), "stages.sft.config.data.0: Value error, source 'jsonl' needs `path`"),
        (GOOD.replace("name: t", "nme: t"), "nme: unknown field"),
        (GOOD.replace("steps: 5", "steps: 5, num_cpus: 2"), "num_cpus: unknown field (moved: did you mean 'learner.cpus_per_worker'?)"),
        ("name: t\nstages: {o: {kind: opd, config: {student: x, teachers: [{model: x, domains: [m]}], data: [{}], "
         "max_new_tokens: 8}}}\n", "max_new_tokens: unknown field (moved: did you mean 'rollout.max_new_tokens'?)"),
        ("name: t\nstages: {o: {kind: opd, config: {student: x, teachers: [{model: x, domains: [m]}], data: [{}], "
         "device: cpu}}}\n", "device: unknown field (moved: did you mean 'learner.gpus_per_worker'?)"),
        ("name: t\nstages: {o: {kind: opd, config: {student: x, teachers: [{model: x, domains: [m]}], data: [{}], "
         "learner: {lora: {r: 4}}}}}\n", "stages.o.config.learner: Value error, learner.lora is for sft and grpo; this "
                                         "stage trains its whole model (remove learner.lora)"),
        ("name: t\nstages: {r: {kind: reward_model, config: {learner: {lora: {r: 4}}}}}\n",
         "stages.r.config.learner: Value error, learner.lora is for sft and grpo"),
        (GOOD.replace("model: base", "model: s3://bucket/ckpt"),  # only OPD teachers are fetched from storage
         "stages.sft.config.model: 's3://bucket/ckpt' does not exist"),
        (GOOD + "sandbox: {size: 0}\n", "sandbox.size: Input should be greater than or equal to 1"),
        (GOOD + "  ev: {kind: eval, needs: [sft], config: {models: [sft], relative: {sft: {math: base}}}}\n",
         "relative.sft.math: 'base' is not one of models (sft)"),
        (GOOD + "  ev: {kind: eval, needs: [base, sft], config: {models: [base, sft], model_domains: {sft: [code]}}}\n",
         "model_domains.sft: 'code' is not a domain of data (math)"),
        (GOOD + "  ev: {kind: eval, needs: [base, sft], config: {models: [base, sft], data: [{}, {domain: code, source: "
         "generator, task: 'experts.tasks:code_samples'}], model_domains: {base: [code]}, relative: {sft: {math: base}}}}\n",
         "relative.sft.math: 'base' is not scored on 'math' (model_domains)"),
        (GOOD.replace("steps: 5", "steps: 5, mix: {math: 1, code: 1}"),
         "mix names ['code', 'math']; give a share for each domain of data: ['math']"),
        (GOOD + "  x: [\n", "not valid YAML at line"),
        ("- just\n- a list\n", "expected a mapping"),
        (b"\xff\xfe\x00bad", "cannot read"),
    ],
)
def test_bad_workflow_gives_one_line(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_model_path_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notackpt").mkdir()
    msg = error_of(tmp_path, GOOD.replace("model: base", f"model: {tmp_path / 'notackpt'}"))
    assert "is not a Hugging Face checkpoint (no config.json)" in msg


def test_cli_prints_one_line_and_no_traceback(tmp_path):
    f = tmp_path / "wf.yaml"
    f.write_text(GOOD.replace("steps: 5", "stepz: 5"))
    for cmd in ("validate", "run"):
        r = subprocess.run([sys.executable, "-m", "pipeline", cmd, str(f)], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 2
        assert r.stderr.strip() == f"error: {f}: stages.sft.config.stepz: unknown field (did you mean 'steps'?)"
        assert "Traceback" not in r.stderr


def test_cli_missing_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: no such file"


def test_validate_prints_stage_graph():
    r = subprocess.run([sys.executable, "-m", "pipeline", "validate", "workflows/quickstart.yaml"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "grpo_math" in r.stdout and "<- mixed_sft" in r.stdout
