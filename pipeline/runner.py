"""Run a workflow's stages on Ray: side by side where their needs and the cluster allow; skip finished
ones, resume killed ones. Each stage's driver is its own Ray task (its own process, its own stage.log)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from pipeline.config import Stage, StageFailed, UserError, Workflow
from pipeline.context import StageContext, atomic_write_json, atomic_write_text
from pipeline.schedule import run_graph, stage_error
from pipeline.stages import resources, stage_module
from pipeline.tracking import open_tracker

log = logging.getLogger(__name__)

DONE_FILE = "DONE.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
# Set by `pipeline submit` in each stage job's environment to the workflow directory whose lock the
# submitting driver holds, so the job's own `pipeline run --stage` does not wait on its parent.
LOCK_HELD_ENV = "PIPELINE_LOCK_HELD"


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


def workflow_dir(wf: Workflow, runs_dir: Path) -> Path:
    """`runs_dir/<workflow>`, resolved; refuses one that resolves anywhere but directly inside runs_dir.

    Names are checked at load time; this is defence in depth against a symlink or a name that
    slipped past, since the runner writes here and `--force` removes stage directories under it.
    """
    root = Path(runs_dir).resolve()
    return inside(root / wf.name, root)


def stage_dirs(wf: Workflow, runs_dir: Path) -> dict[str, Path]:
    """Every stage's artifact directory, each checked to resolve directly inside the workflow's."""
    top = workflow_dir(wf, runs_dir)
    return {name: inside(top / name, top) for name in wf.stages}


def inside(path: Path, parent: Path) -> Path:
    """`path` resolved, if it is a child of `parent` (resolved); else a UserError naming both."""
    resolved = Path(path).resolve()
    if resolved.parent != Path(parent).resolve() or resolved.name in ("", ".", ".."):
        raise UserError(f"{path} resolves to {resolved}, outside {parent}; refusing to write or remove it")
    return resolved


@contextmanager
def workflow_lock(wf_dir: Path) -> Iterator[None]:
    """Hold `wf_dir/.lock` (flock) for the block; a second holder is refused at once, naming our pid.

    The kernel drops a flock when its holder dies, even by SIGKILL, so a crash never leaves it held.
    `pipeline submit` holds the lock in its driver and sets PIPELINE_LOCK_HELD for its stage jobs.
    """
    if os.environ.get(LOCK_HELD_ENV) == str(wf_dir):
        yield
        return
    try:
        wf_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(wf_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{wf_dir}: cannot create the run directory: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
        os.close(fd)
        raise UserError(f"{wf_dir}: another run of this workflow is in progress ({holder}, holding "
                        f"{wf_dir / LOCK_FILE}); wait for it to finish or stop it") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


# `learner:` fields that say where and how a trainer runs, not what it computes: a run may resume
# (or be skipped as done) with more or fewer workers. dtype and mixed_precision change the numbers.
HOW_NOT_WHAT = ("workers", "cpus_per_worker", "gpus_per_worker", "threads", "placement", "strategy",
                "activation_checkpointing", "collective_timeout_s")


def stage_record(stage: Stage) -> dict:
    """The stage's resolved config, written as config.yaml: its seed, and the command-line overrides
    that set any of it (already applied to `config`; listed so a reader sees where a value came from)."""
    record = {"kind": stage.kind, "needs": list(stage.needs), "seed": stage.seed,
              "config": stage.config.model_dump(mode="json")}
    if stage.overrides:
        record["overrides"] = list(stage.overrides)
    return record


def defining(record: dict) -> dict:
    """What defines a stage's result (hashed into DONE.json): the record less where its actors run,
    and less the overrides' spelling (`lr=1e-4` and `lr=0.0001` give the same config)."""
    record = {k: v for k, v in record.items() if k != "overrides"}
    config = dict(record.get("config", {}))
    if isinstance(config.get("learner"), dict):
        config["learner"] = {k: v for k, v in config["learner"].items() if k not in HOW_NOT_WHAT}
    if isinstance(config.get("rollout"), dict):
        config["rollout"] = {k: v for k, v in config["rollout"].items() if k != "placement"}
    return {**record, "config": config} if "config" in record else record


def config_hash(stage: Stage) -> str:
    return hashlib.sha256(json.dumps(defining(stage_record(stage)), sort_keys=True).encode()).hexdigest()[:16]


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
    wf: Workflow, runs_dir: Path, only: str | None = None, force: bool = False, address: str | None = None,
    max_parallel: int | None = None,
) -> dict[str, str]:
    """Run every stage (or just `only`, here in this process). Returns {stage: "ran" | "skipped"}.

    Stages whose needs are done start together, up to `max_parallel` and what the cluster's
    resources admit (`pipeline.schedule`); each runs as a Ray task pinned to this node, so every
    stage reads and writes the same runs directory.
    """
    if only is not None and only not in wf.stages:
        raise UserError(f"{wf.path}: --stage {only!r}: no such stage; stages are {', '.join(wf.stages)}")
    dirs = stage_dirs(wf, runs_dir)
    top = workflow_dir(wf, runs_dir)
    with workflow_lock(top):  # every run, --stage or not: one writer per workflow
        todo = [only] if only else list(wf.stages)
        for name in todo:  # a lone stage needs its inputs finished already
            for dep in wf.stages[name].needs:
                if only and not is_done(wf.stages[dep], dirs[dep]):
                    raise UserError(f"stage {name!r} needs {dep!r}, which has not finished; run it first")
        init_ray(address)
        return _run(wf, dirs, top, todo, only, force, max_parallel)


@contextmanager
def sandbox_services(wf: Workflow) -> Iterator[None]:
    """With a `sandbox:` block: one sandbox service per node for the run, stopped after it.

    A stage job of `pipeline submit` (PIPELINE_LOCK_HELD set) finds or starts them and leaves them
    running for the other jobs; the submitting driver stops them at the end.
    """
    if wf.sandbox is None:
        yield
        return
    from sandbox.service import start_services, stop_services

    start_services(wf.sandbox)
    try:
        yield
    finally:
        if os.environ.get(LOCK_HELD_ENV) is None:
            stop_services()


def _run(wf: Workflow, dirs: dict[str, Path], top: Path, todo: list[str], only: str | None, force: bool,
         max_parallel: int | None) -> dict[str, str]:
    """Skip finished stages (removing them first with --force), then run the rest."""
    status = {}
    for name in todo:
        if force and dirs[name].exists():
            shutil.rmtree(inside(dirs[name], top))
        if is_done(wf.stages[name], dirs[name]):
            log.info("stage %s: finished earlier, skipping (use --force to redo)", name)
            status[name] = "skipped"
    left = [n for n in todo if n not in status]
    if not left:
        return status
    with sandbox_services(wf):
        if only:
            run_stage(wf, wf.stages[only], dirs)
        else:
            import ray

            capacity = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            run_graph(wf, left, set(status), StageTasks(wf, dirs), lambda n: resources(wf.stages[n]), capacity,
                      max_parallel)
    return {n: status.get(n, "ran") for n in todo}


class StageTasks:
    """`pipeline run`'s launcher: each stage's driver a Ray task on this node, in a fresh process."""

    def __init__(self, wf: Workflow, dirs: dict[str, Path]):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.task = ray.remote(num_cpus=0, max_calls=1, max_retries=0, scheduling_strategy=here)(stage_task)
        self.wf, self.dirs, self.refs = wf, dirs, {}

    def start(self, name: str) -> None:
        self.refs[self.task.remote(self.wf, name, self.dirs)] = name

    def wait_one(self) -> tuple[str, Exception | None]:
        import ray

        [ref], _ = ray.wait(list(self.refs), num_returns=1)
        name = self.refs.pop(ref)
        try:
            outcome = ray.get(ref)
        except Exception as e:  # the task's process died (OOM kill, a crash in native code)
            return name, StageFailed(f"stage {name!r} ({self.wf.stages[name].kind}): its driver died: "
                                     f"{str(e).strip().splitlines()[-1]}; log: {self.dirs[name] / 'stage.log'}")
        return name, None if outcome is None else stage_error(*outcome)


def stage_task(wf: Workflow, name: str, dirs: dict[str, Path]) -> tuple[str, str] | None:
    """One stage in a Ray task: None when it finished, else ("user" | "failed", one line naming it and its log)."""
    logging.getLogger().setLevel(logging.INFO)
    log_file = dirs[name] / "stage.log"
    try:
        run_stage(wf, wf.stages[name], dirs)
    except UserError as e:
        return "user", f"{e}; log: {log_file}"
    except StageFailed as e:
        return "failed", f"{e}; log: {log_file}"
    except Exception as e:  # a bug: the traceback is in stage.log
        first = (str(e).strip().splitlines() or [""])[0]
        return "failed", f"stage {name!r} ({wf.stages[name].kind}): {type(e).__name__}: {first}; log: {log_file}"
    return None


def run_stage(wf: Workflow, stage: Stage, dirs: dict[str, Path]) -> None:
    out = dirs[stage.name]
    out.mkdir(parents=True, exist_ok=True)
    record = yaml.safe_dump(stage_record(stage), sort_keys=False)
    previous = out / CONFIG_FILE
    if previous.exists() and defining(yaml.safe_load(previous.read_text()) or {}) != defining(stage_record(stage)):
        raise UserError(
            f"stage {stage.name!r} has a partial run with a different config in {out}; rerun with --force"
        )
    atomic_write_text(previous, record)
    handler = logging.FileHandler(out / "stage.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    t0 = time.time()
    log.info("stage %s (%s): starting in %s", stage.name, stage.kind, out)
    tracker = open_tracker(wf.tracking, wf.name, stage.name, stage.kind, stage_record(stage), out)
    ctx = StageContext(wf.name, stage.name, out, dirs, seed=stage.seed, tracker=tracker)
    ok = False
    try:
        stage_module(stage.kind).run(stage.config, ctx)
        ok = True
    except UserError as e:  # bad input found mid-run (data, a diverged loss): name the stage, keep it one line
        cause = getattr(e, "cause", None) or e  # a RayTaskError from an actor carries the real error as `cause`
        log.error("stage %s: %s", stage.name, cause)
        raise UserError(f"stage {stage.name!r} ({stage.kind}): {cause}") from None
    except StageFailed as e:  # e.g. a learner worker died: one line naming the stage and the worker
        log.error("stage %s: %s", stage.name, e)
        raise StageFailed(f"stage {stage.name!r} ({stage.kind}): {e}") from None
    except Exception:
        log.exception("stage %s: failed", stage.name)  # the traceback goes to stage.log too
        raise
    finally:
        tracker.close(ok)  # a failed stage's W&B / MLflow run is marked failed
        logging.getLogger().removeHandler(handler)
        handler.close()
    atomic_write_json(out / DONE_FILE, {"config_hash": config_hash(stage), "seconds": round(time.time() - t0, 1),
                                        "started": round(t0, 3), "ended": round(time.time(), 3),
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log.info("stage %s: done in %.1fs", stage.name, time.time() - t0)
