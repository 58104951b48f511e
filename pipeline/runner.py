"""Run a workflow's stages in dependency order on Ray: skip finished ones, resume killed ones."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path

import yaml

from pipeline.config import Stage, UserError, Workflow
from pipeline.context import StageContext, atomic_write_json, atomic_write_text
from pipeline.stages import stage_module

log = logging.getLogger(__name__)

DONE_FILE = "DONE.json"
CONFIG_FILE = "config.yaml"


def init_ray(address: str | None) -> None:
    """Connect to `address` (or $RAY_ADDRESS), else start an embedded local Ray in this process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)


def stage_dirs(wf: Workflow, runs_dir: Path) -> dict[str, Path]:
    return {name: (runs_dir / wf.name / name).resolve() for name in wf.stages}


def stage_record(stage: Stage) -> dict:
    """What defines a stage's result: written as config.yaml and hashed into DONE.json."""
    return {"kind": stage.kind, "needs": list(stage.needs), "config": stage.config.model_dump(mode="json")}


def config_hash(stage: Stage) -> str:
    return hashlib.sha256(json.dumps(stage_record(stage), sort_keys=True).encode()).hexdigest()[:16]


def is_done(stage: Stage, out_dir: Path) -> bool:
    """True when the stage finished with this very config; an edited config must be forced."""
    done = out_dir / DONE_FILE
    if not done.exists():
        return False
    if json.loads(done.read_text()).get("config_hash") != config_hash(stage):
        raise UserError(
            f"stage {stage.name!r} finished earlier with a different config ({out_dir / CONFIG_FILE}); "
            f"rerun with --force to redo it"
        )
    return True


def run_workflow(
    wf: Workflow, runs_dir: Path, only: str | None = None, force: bool = False, address: str | None = None
) -> dict[str, str]:
    """Run every stage (or just `only`), in order. Returns {stage: "ran" | "skipped"}."""
    if only is not None and only not in wf.stages:
        raise UserError(f"{wf.path}: --stage {only!r}: no such stage; stages are {', '.join(wf.stages)}")
    dirs = stage_dirs(wf, runs_dir)
    todo = [only] if only else list(wf.stages)
    for name in todo:  # a lone stage needs its inputs finished already
        for dep in wf.stages[name].needs:
            if only and not is_done(wf.stages[dep], dirs[dep]):
                raise UserError(f"stage {name!r} needs {dep!r}, which has not finished; run it first")
    init_ray(address)
    status = {}
    for name in todo:
        stage = wf.stages[name]
        if force and dirs[name].exists():
            shutil.rmtree(dirs[name])
        if is_done(stage, dirs[name]):
            log.info("stage %s: finished earlier, skipping (use --force to redo)", name)
            status[name] = "skipped"
            continue
        run_stage(wf, stage, dirs)
        status[name] = "ran"
    return status


def run_stage(wf: Workflow, stage: Stage, dirs: dict[str, Path]) -> None:
    out = dirs[stage.name]
    out.mkdir(parents=True, exist_ok=True)
    record = yaml.safe_dump(stage_record(stage), sort_keys=False)
    previous = out / CONFIG_FILE
    if previous.exists() and previous.read_text() != record:
        raise UserError(
            f"stage {stage.name!r} has a partial run with a different config in {out}; rerun with --force"
        )
    atomic_write_text(previous, record)
    ctx = StageContext(wf.name, stage.name, out, dirs, seed=wf.seed + zlib.crc32(stage.name.encode()) % 10_000)
    handler = logging.FileHandler(out / "stage.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    t0 = time.time()
    log.info("stage %s (%s): starting in %s", stage.name, stage.kind, out)
    try:
        stage_module(stage.kind).run(stage.config, ctx)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    atomic_write_json(out / DONE_FILE, {"config_hash": config_hash(stage), "seconds": round(time.time() - t0, 1),
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log.info("stage %s: done in %.1fs", stage.name, time.time() - t0)
