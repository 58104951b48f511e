"""Experiment tracking: a workflow's `tracking:` block sends every stage's metrics and config to
TensorBoard, W&B and MLflow, read back here with each tool's own reader; metrics.jsonl stays the record."""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import UserError, load_workflow
from pipeline.context import StageContext
from pipeline.tracking import TensorBoardSink, Tracker

REPO = Path(__file__).resolve().parents[2]

STAGES = """
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
      steps: 3
      batch_size: 4
"""


def metrics_jsonl(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {name: [(step, value), ...]} for its numeric values."""
    out: dict[str, list] = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                out.setdefault(key, []).append((row["step"], float(value)))
    return out


def same_points(got: list[tuple[int, float]], want: list[tuple[int, float]], rel: float = 1e-9) -> bool:
    """Same steps in the same order, values equal up to `rel` (TensorBoard keeps float32)."""
    return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel)


def tensorboard_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """The scalars (as float32, as TensorBoard stores them) and the `config` text of one event directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    values = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    return values, text


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (`run-<id>.wandb`).

    wandb 0.31 ships no Python reader for it any more, so this is one: the LevelDB log format, a
    7-byte header (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a
    4-byte CRC, 2-byte length, 1-byte type (1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run(run_file: Path) -> dict:
    """What a W&B run file holds: its name, group, job type, config, history by metric, and exit code."""
    run = {"history": {}, "config": {}}
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type,
                       project=rec.run.project, entity=rec.run.entity)
            run["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            run["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            step = rec.history.step.num
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    run["history"].setdefault(key, []).append((step, float(json.loads(item.value_json))))
        elif kind == "exit":
            run["exit_code"] = rec.exit.exit_code
    return run


def test_every_sink_gets_each_stages_metrics_at_the_same_steps_and_its_config(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    wf = tmp_path / "wf.yaml"
    wf.write_text("name: tracked\n"
                  "tracking: {tensorboard: true, wandb: {project: p, entity: e, mode: offline}, mlflow: {}}\n" + STAGES)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}
    env.pop("WANDB_DIR", None), env.pop("MLFLOW_TRACKING_URI", None)  # the defaults: under runs/tracked
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(wf), "--runs-dir", str(runs)], cwd=REPO,
                       env=env, text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    top = runs / "tracked"
    expected = {stage: metrics_jsonl(top / stage) for stage in ("base", "sft")}
    records = {stage: yaml.safe_load((top / stage / "config.yaml").read_text()) for stage in expected}
    assert {"params", "vocab"} <= set(expected["base"]) and [s for s, _ in expected["sft"]["loss"]] == [1, 2, 3]
    for stage in expected:
        assert "tracking:" not in (top / stage / "stage.log").read_text()  # no sink warned

    # TensorBoard: one event directory per stage, the same scalars at the same steps.
    for stage, want in expected.items():
        got, text = tensorboard_scalars(top / stage / "tensorboard")
        assert set(got) == set(want)
        for name, points in want.items():
            assert same_points(got[name], points, rel=1e-6), (name, got[name], points)
        assert yaml.safe_load(text.replace("\n    ", "\n").strip()) == records[stage]

    # W&B: a run per stage, grouped by workflow, job type = kind, config = config.yaml, same history.
    files = sorted((top / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    wandb_runs = {run["name"]: run for run in map(wandb_run, files)}
    for stage, want in expected.items():
        run = wandb_runs[stage]
        assert (run["group"], run["job_type"], run["project"], run["entity"]) == ("tracked", records[stage]["kind"], "p", "e")
        assert {k: v for k, v in run["config"].items() if not k.startswith("_")} == records[stage]
        assert set(run["history"]) == set(want)
        for name, points in want.items():
            assert same_points(run["history"][name], points), (name, run["history"][name], points)
        assert run["exit_code"] == 0

    # MLflow: a parent run for the workflow, a finished run per stage nested in it, same metrics and the config.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((top / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tracked")
    parent_id = json.loads((top / "mlflow_run.json").read_text())["run_id"]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert client.get_run(parent_id).info.run_name == "tracked"
    assert sorted(run.info.run_name for run in children) == ["base", "sft"]
    for run in children:
        stage, want = run.info.run_name, expected[run.info.run_name]
        assert run.info.status == "FINISHED"
        assert set(run.data.metrics) == set(want)
        for name, points in want.items():
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
            assert same_points(history, points), (name, history, points)
        assert run.data.params["kind"] == records[stage]["kind"]
        assert run.data.params["seed"] == str(records[stage]["seed"])
        config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
        assert config == records[stage]
    sft = next(run for run in children if run.info.run_name == "sft")
    assert sft.data.params["config.steps"] == "3" and sft.data.params["config.data.0.size"] == "40"


class Broken:
    """A sink whose backend went away mid-run (a dead tracking server, a full disk)."""

    name = "broken"

    def log(self, step, values):
        raise ConnectionError("tracking server unreachable")

    def close(self, ok):
        raise AssertionError("a dropped sink is not closed")


def test_a_sink_that_fails_mid_run_warns_once_and_the_stage_goes_on(tmp_path, caplog):
    tensorboard = TensorBoardSink(tmp_path, {"kind": "sft"})
    ctx = StageContext("wf", "sft", tmp_path, tracker=Tracker([Broken(), tensorboard]))
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        for step in (1, 2, 3):
            ctx.log_metrics(step, {"loss": 1.0 / step, "note": "not a number"})
        ctx.tracker.close(ok=True)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "broken failed while logging" in warnings[0] and "unreachable" in warnings[0]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    got, _ = tensorboard_scalars(tmp_path / "tensorboard")
    assert set(got) == {"loss"} and same_points(got["loss"], [(1, 1.0), (2, 0.5), (3, 1 / 3)], rel=1e-6)  # the rest got all


def test_a_failed_stage_marks_its_mlflow_run_failed_and_a_pickled_context_tracks_nothing(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import TrackingConfig, open_tracker

    out = tmp_path / "wf" / "sft"
    out.mkdir(parents=True)
    cfg = TrackingConfig(mlflow={"tracking_uri": (tmp_path / "mlruns").as_uri(), "experiment": "exp"})
    tracker = open_tracker(cfg, "wf", "sft", "sft", {"kind": "sft", "config": {"lr": 0.1}}, out)
    assert [s.name for s in tracker.sinks] == ["mlflow"]
    run_id = tracker.sinks[0].run_id
    ctx = StageContext("wf", "sft", out, tracker=tracker)
    ctx.log_metrics(1, {"loss": 2.0})
    copy = pickle.loads(pickle.dumps(ctx))  # what a Ray actor handed `ctx.model_path` gets
    copy.log_metrics(2, {"loss": 1.0})
    tracker.close(ok=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    assert client.get_run(run_id).info.status == "FAILED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.0)]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # the file has both


@pytest.mark.parametrize("block, expected", [
    ("{wandb: {projct: p}}", "wf.yaml: tracking.wandb.projct: unknown field (did you mean 'project'?)"),
    ("{wandb: {mode: onlin}}", "wf.yaml: tracking.wandb.mode: Input should be 'online', 'offline' or 'disabled', "
                               "got 'onlin'"),
    ("{tensorbord: true}", "wf.yaml: tracking.tensorbord: unknown field (did you mean 'tensorboard'?)"),
    ("{mlflow: {tracking_uri: 3}}", "wf.yaml: tracking.mlflow.tracking_uri: Input should be a valid string, got 3"),
])
def test_a_bad_tracking_block_is_one_line_naming_the_field(tmp_path, block, expected):
    wf = tmp_path / "wf.yaml"
    wf.write_text(f"name: t\ntracking: {block}\n" + STAGES)
    with pytest.raises(UserError) as e:
        load_workflow(wf)
    assert str(e.value).endswith(expected)


@pytest.mark.parametrize("sink, module, block", [
    ("wandb", "wandb", "{wandb: {project: p}}"),
    ("mlflow", "mlflow", "{mlflow: {}}"),
    ("tensorboard", "tensorboard", "{tensorboard: true}"),
])
def test_a_sink_whose_package_is_missing_is_refused_at_validation_naming_the_pip_install(
        tmp_path, monkeypatch, sink, module, block):
    monkeypatch.setitem(sys.modules, module, None)  # how Python marks a module as not importable
    wf = tmp_path / "wf.yaml"
    wf.write_text(f"name: t\ntracking: {block}\n" + STAGES)
    with pytest.raises(UserError) as e:
        load_workflow(wf)
    assert str(e.value).endswith(f"wf.yaml: tracking.{sink}: the {module} package is not installed; pip install {module}")


def test_the_examples_in_pipeline_tracking_hold():
    import doctest

    import pipeline.tracking

    result = doctest.testmod(pipeline.tracking)
    assert result.attempted >= 3 and result.failed == 0
