"""Experiment tracking: every stage's metrics and resolved config, also in TensorBoard, W&B or MLflow.

    tracking:
      tensorboard: true                                 # runs/<wf>/<stage>/tensorboard/
      wandb: {project: p, entity: e, mode: offline}     # runs/<wf>/wandb/ unless `dir`
      mlflow: {tracking_uri: http://host:5000}          # default: file store runs/<wf>/mlruns

`metrics.jsonl` is always written and stays the full record; the sinks get the same metric names at
the same `step`, numbers only. How one workflow run maps onto each tool:

- TensorBoard: one event directory per stage, so `tensorboard --logdir runs/<wf>` shows every stage
  as a run; the stage's config is a text summary named `config`.
- W&B: one run per stage, named after it, `group=<workflow>`, `job_type=<stage kind>`; the config
  is the run's config. A stage that fails finishes its run with exit code 1 (marked failed).
- MLflow: an experiment (default: the workflow's name) with one parent run per workflow and a run
  per stage nested under it. The parent's id is kept in runs/<wf>/mlflow_run.json, created under a
  file lock, so stages running side by side and later `--stage` runs share it. The config is
  logged as flattened params (values past MLflow's 6000 characters cut, marked '...') and in full
  as the artifact `config.yaml`.

A stage that is resumed or forced starts a new run in each tool. A sink that fails (at start or
mid-run) logs one warning and is dropped for the rest of the stage: tracking never kills training.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

MLFLOW_PARENT_FILE = "mlflow_run.json"  # in runs/<wf>/: the workflow's MLflow parent run


class WandbConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str | None = Field(None, description="W&B project; default: $WANDB_PROJECT, else the workflow's name.")
    entity: str | None = Field(None, description="W&B team or user; default: $WANDB_ENTITY, else your default entity.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="online, offline (sync later with `wandb sync`) or disabled; default: $WANDB_MODE, else online.")
    dir: str | None = Field(None, description="Where W&B writes its run files (under <dir>/wandb/); default: "
                                              "$WANDB_DIR, else runs/<workflow>. Absolute for `pipeline submit`.")
    tags: list[str] = Field(default_factory=list, description="Tags on every stage's run.")


class MlflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str | None = Field(None, description="MLflow tracking server or store; default: "
                                     "$MLFLOW_TRACKING_URI, else a file store in runs/<workflow>/mlruns.")
    experiment: str | None = Field(None, description="Experiment holding the runs; default: the workflow's name.")


class TrackingConfig(BaseModel):
    """The workflow's `tracking:` block: which tools get each stage's metrics besides metrics.jsonl."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensorboard: bool = Field(False, description="Write TensorBoard events to runs/<workflow>/<stage>/tensorboard/.")
    wandb: WandbConfig | None = Field(None, description="Log each stage as a W&B run grouped by workflow.")
    mlflow: MlflowConfig | None = Field(None, description="Log each stage as an MLflow run nested in one per workflow.")


# Sink -> the module it imports and the pip package that provides it.
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def missing_package(cfg: TrackingConfig) -> str | None:
    """'tracking.<sink>: ...; pip install <package>' for the first sink turned on whose package is missing."""
    for sink, (module, package) in PACKAGES.items():
        if getattr(cfg, sink) and importlib.util.find_spec(module) is None:
            return f"tracking.{sink}: the {package} package is not installed; pip install {package}"
    return None


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics a scalar sink can plot: numbers (Python, NumPy or 0-d tensors) as floats; the rest skipped.

    >>> scalars({"loss": 0.5, "ok": True, "note": "hi", "sizes": [1, 2], "n": None})
    {'loss': 0.5, 'ok': 1.0}
    """
    out = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, (str, bytes)):
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class Sink(Protocol):
    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, ok: bool) -> None: ...


class Tracker:
    """A stage's sinks: `log` fans a metrics line out to each; one that raises is warned about once and dropped.

    A pickled copy (a Ray actor handed `ctx.model_path`, say) has no sinks: only the driver tracks.
    """

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = scalars(metrics) if self.sinks else {}
        if values:
            self._each(lambda s: s.log(step, values), "logging")

    def close(self, ok: bool) -> None:
        self._each(lambda s: s.close(ok), "closing")
        self.sinks = []

    def _each(self, call, doing: str) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as e:  # tracking must never kill training: metrics.jsonl has everything
                log.warning("tracking: %s failed while %s (%s: %s); it is off for the rest of this stage, "
                            "metrics.jsonl has every metric", sink.name, doing, type(e).__name__, e)
                self.sinks.remove(sink)

    def __getstate__(self) -> dict:
        return {"sinks": []}


def open_tracker(cfg: TrackingConfig, workflow: str, stage: str, kind: str, record: dict, out_dir: Path) -> Tracker:
    """The sinks `cfg` turns on, each started for this stage with its config `record` logged; one that
    cannot start is a warning, not an error."""
    openers = {"tensorboard": lambda: TensorBoardSink(out_dir, record),
               "wandb": lambda: WandbSink(cfg.wandb, workflow, stage, kind, record, out_dir.parent),
               "mlflow": lambda: MlflowSink(cfg.mlflow, workflow, stage, kind, record, out_dir.parent)}
    sinks = []
    for name, opener in openers.items():
        if not getattr(cfg, name):
            continue
        try:
            sinks.append(opener())
        except Exception as e:
            log.warning("tracking: %s could not start (%s: %s); going on without it", name, type(e).__name__, e)
    return Tracker(sinks)


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, out_dir: Path, record: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        text = yaml.safe_dump(record, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "))  # indented: shown as code

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # as metrics.jsonl: a killed stage keeps what it logged

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandbSink:
    name = "wandb"

    def __init__(self, cfg: WandbConfig, workflow: str, stage: str, kind: str, record: dict, wf_dir: Path):
        import wandb

        self.run = wandb.init(
            project=cfg.project or os.environ.get("WANDB_PROJECT") or workflow, entity=cfg.entity, mode=cfg.mode,
            dir=cfg.dir or os.environ.get("WANDB_DIR") or str(wf_dir), group=workflow, name=stage, job_type=kind,
            tags=cfg.tags or None, config=record, reinit="create_new",
            # console off: the stage's output already goes to stage.log; W&B's capture would wrap it again
            settings=wandb.Settings(console="off", save_code=False))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MlflowSink:
    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, workflow: str, stage: str, kind: str, record: dict, wf_dir: Path):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (wf_dir / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3.x keeps its file store only behind this opt-in (the database store needs
            # SQLAlchemy, which mlflow-skinny leaves out); it still works, in maintenance mode.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(uri)
        experiment = cfg.experiment or workflow
        parent = parent_run(client, uri, experiment, workflow, wf_dir)
        run = client.create_run(parent["experiment_id"], run_name=stage,
                                tags={"mlflow.parentRunId": parent["run_id"], "workflow": workflow, "stage_kind": kind})
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flat_params(record).items()]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        client.log_dict(self.run_id, record, "config.yaml")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def parent_run(client, uri: str, experiment: str, workflow: str, wf_dir: Path) -> dict:
    """The workflow's MLflow parent run ({"experiment_id", "run_id"}), created by the first stage to ask.

    Stages start side by side in separate processes, so the check-and-create holds a file lock.
    The parent is a finished container (the stages carry status and metrics): the MLflow UI then
    shows no workflow as forever running.
    """
    path = wf_dir / MLFLOW_PARENT_FILE
    fd = os.open(wf_dir / ".mlflow.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if path.exists():
            known = json.loads(path.read_text())
            if known.get("tracking_uri") == uri and known.get("experiment") == experiment and _alive(client, known["run_id"]):
                return known
        found = client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage != "active":
            raise RuntimeError(f"MLflow experiment {experiment!r} is deleted; restore it or name another")
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=workflow, tags={"workflow": workflow})
        client.set_terminated(run.info.run_id, "FINISHED")
        known = {"tracking_uri": uri, "experiment": experiment, "experiment_id": experiment_id, "run_id": run.info.run_id}
        from pipeline.context import atomic_write_json

        atomic_write_json(path, known)
        return known
    finally:
        os.close(fd)  # releases the lock


def _alive(client, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # gone from the store (a wiped mlruns/, another server): start a new parent
        return False


def flat_params(record: dict, max_len: int = 6000) -> dict[str, str]:
    """The config as MLflow params: nested keys dotted, lists of scalars as JSON, values cut to `max_len`
    (MLflow's limit) with a '...' mark; the full config goes beside them as an artifact.

    >>> flat_params({"kind": "sft", "config": {"lr": 0.001, "data": [{"size": 40}], "ids": [1, 2], "x": None}})
    {'kind': 'sft', 'config.lr': '0.001', 'config.data.0.size': '40', 'config.ids': '[1, 2]', 'config.x': 'None'}
    """
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        else:
            text = json.dumps(value) if isinstance(value, list) else str(value)
            out[mlflow_key(key)] = text if len(text) <= max_len else text[:max_len - 3] + "..."

    walk(record, "")
    return out


def mlflow_key(name: str) -> str:
    """`name` with the characters MLflow refuses in metric and param names (all but letters, digits,
    '_', '-', '.', ' ', '/') replaced by '_': a hub id's '@revision' becomes '_revision'.

    >>> mlflow_key("score/math/Qwen/Qwen2-0.5B@main")
    'score/math/Qwen/Qwen2-0.5B_main'
    """
    return re.sub(r"[^/\w.\- ]", "_", name)[:250]
