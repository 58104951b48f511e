"""Command-line overrides, as a Hydra user types them: `pipeline run FILE stages.sft.config.lr=1e-4 seed=3`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import UserError, load_workflow

REPO = Path(__file__).resolve().parents[2]

WORKFLOW = """
name: ovr
stages:
  base:
    kind: base_model
    config:
      tokenizer_data: [{domain: math, source: generator, task: "experts.tasks:echo_samples", size: 40}]
      vocab_size: 300
      model: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, intermediate_size: 64}
  sft:
    kind: sft
    needs: [base]
    config:
      model: base
      data: {domain: math, source: generator, task: "experts.tasks:echo_samples", size: 40, heldout: 4}
      steps: 2
      batch_size: 4
      lr: 0.001
"""


def pipeline(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, text=True,
                          capture_output=True, timeout=600)


@pytest.fixture
def wf(tmp_path) -> Path:
    path = tmp_path / "wf.yaml"
    path.write_text(WORKFLOW)
    return path


def test_overrides_set_fields_with_yaml_values_and_numbers_as_typed(wf):
    loaded = load_workflow(wf, ["stages.sft.config.lr=1e-4", "seed=3", "stages.sft.config.learner.threads=1",
                                "stages.sft.config.data.heldout=2", "~stages.sft.config.batch_size"])
    sft = loaded.stages["sft"]
    assert sft.config.lr == 1e-4  # '1e-4' is a number, not YAML 1.1's string
    assert loaded.seed == 3 and sft.seed != loaded.stages["base"].seed
    assert sft.config.learner.threads == 1  # a block the file left out is created
    assert sft.config.data[0].heldout == 2  # sft normalises one dataset to a list
    default = load_workflow(wf).stages["sft"].config
    assert sft.config.batch_size == type(default).model_fields["batch_size"].default  # ~KEY: back to the default
    assert sft.overrides == ("stages.sft.config.lr=1e-4", "seed=3", "stages.sft.config.learner.threads=1",
                             "stages.sft.config.data.heldout=2", "~stages.sft.config.batch_size")
    assert loaded.stages["base"].overrides == ("seed=3",)


@pytest.mark.parametrize("override, expected", [
    ("stages.sft.config.lr=-1", "wf.yaml: stages.sft.config.lr: Input should be greater than 0, got -1 "
                                "(set by override 'stages.sft.config.lr=-1')"),
    ("stages.sft.config.lrr=1e-4", "wf.yaml: stages.sft.config.lrr: unknown field (did you mean 'lr'?) "
                                   "(set by override 'stages.sft.config.lrr=1e-4')"),
    ("stages.sfx.config.lr=1e-4", "wf.yaml: override 'stages.sfx.config.lr=1e-4': no stage 'sfx' (did you mean 'sft'?)"),
    ("stages.sft.config.lr.x=1", "wf.yaml: override 'stages.sft.config.lr.x=1': stages.sft.config.lr is 0.001, "
                                 "not a mapping or a list"),
    ("lr", "wf.yaml: override 'lr': expected KEY=VALUE or ~KEY, with KEY a dotted path such as "
           "stages.sft_math.config.lr"),
    ("seed=[1", "wf.yaml: override 'seed=[1': not valid YAML: expected ',' or ']', but got '<stream end>'"),
    ("~stages.sft.config.warmup", "wf.yaml: override '~stages.sft.config.warmup': stages.sft.config.warmup is not "
                                  "set in the file; nothing to remove"),
])
def test_a_bad_override_is_one_line_naming_it(wf, override, expected):
    with pytest.raises(UserError) as e:
        load_workflow(wf, [override])
    assert str(e.value).replace(str(wf.parent) + "/", "") == expected


def test_cli_validates_overrides_and_exits_2_on_a_bad_one(wf):
    r = pipeline("validate", wf, "stages.sft.config.steps=0")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: {wf}: stages.sft.config.steps: Input should be greater than or "
                                             f"equal to 1, got 0 (set by override 'stages.sft.config.steps=0')"]
    assert pipeline("validate", wf, "stages.sft.config.steps=3", "seed=2").returncode == 0


def test_run_records_overrides_in_the_resolved_config_and_refuses_a_changed_one(wf, tmp_path):
    runs = tmp_path / "runs"
    r = pipeline("run", wf, "--runs-dir", runs, "stages.sft.config.lr=1e-4", "--stage", "base")
    assert r.returncode == 0, r.stderr[-2000:]
    r = pipeline("run", wf, "--runs-dir", runs, "stages.sft.config.lr=1e-4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ovr: base skipped, sft ran" in r.stdout
    record = yaml.safe_load((runs / "ovr" / "sft" / "config.yaml").read_text())
    assert record["config"]["lr"] == 1e-4 and record["overrides"] == ["stages.sft.config.lr=1e-4"]

    # The same value spelled another way is the same config: skipped.
    r = pipeline("run", wf, "--runs-dir", runs, "stages.sft.config.lr=0.0001")
    assert r.returncode == 0 and "ovr: base skipped, sft skipped" in r.stdout, r.stderr[-2000:]
    # A different value is refused, as an edited file is, until --force.
    r = pipeline("run", wf, "--runs-dir", runs, "stages.sft.config.lr=2e-4")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: stage 'sft' finished earlier with a different config")
    # The workflow seed changes every stage's seed, so it is part of the rerun check too.
    r = pipeline("run", wf, "--runs-dir", runs, "stages.sft.config.lr=1e-4", "seed=5")
    assert r.returncode == 2 and "stage 'base' finished earlier with a different config" in r.stderr


def test_docstring_examples():
    import doctest

    import pipeline.overrides

    result = doctest.testmod(pipeline.overrides)
    assert result.attempted > 0 and result.failed == 0
