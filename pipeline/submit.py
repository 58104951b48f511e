"""Submit each stage of a workflow as its own Ray job, side by side where needs and resources allow.

Each job is exactly `ray job submit --working-dir . -- python -m pipeline run FILE --stage NAME`:
the current directory is uploaded as the job's code, and artifacts go to an absolute runs
directory, which must be storage every node sees (on one machine, any local path). Which stages
run together is `pipeline.schedule`'s decision, as for `pipeline run`.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path

from pipeline.config import StageFailed, UserError, Workflow
from pipeline.runner import LOCK_HELD_ENV, is_done, stage_dirs, workflow_dir, workflow_lock
from pipeline.schedule import run_graph
from pipeline.stages import resources

log = logging.getLogger(__name__)

EXCLUDES = [".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def entrypoint(workflow: Path, stage: str, runs_dir: Path, overrides: tuple[str, ...] = ()) -> str:
    """The stage job's command line; it carries the submit's overrides so the job runs the same config."""
    extra = "".join(f" {shlex.quote(o)}" for o in overrides)
    return (f"python -m pipeline run {shlex.quote(str(workflow))} --stage {stage} "
            f"--runs-dir {shlex.quote(str(runs_dir))}{extra}")


def submit_workflow(wf: Workflow, address: str, runs_dir: Path, only: str | None = None,
                    force: bool = False, poll_s: float = 1.0, out=sys.stdout, max_parallel: int | None = None) -> None:
    """Submit the stages one job each, stream their logs (each line prefixed `[stage]`), and start
    nothing new after the first failure.

    The driver holds the workflow's lock for the whole submission, as `run` does, so a second
    `submit` or `run` of the workflow is refused. Each job's inner `pipeline run --stage` is told
    (PIPELINE_LOCK_HELD in its environment) that its driver holds the lock, rather than taking it
    itself: the driver waits on that job, so a job waiting on the driver's lock would never start.
    """
    if only is not None and only not in wf.stages:
        raise UserError(f"{wf.path}: --stage {only!r}: no such stage; stages are {', '.join(wf.stages)}")
    wf_dir = workflow_dir(wf, runs_dir)
    with workflow_lock(wf_dir):
        _submit_stages(wf, address, runs_dir, only, force, poll_s, out, wf_dir, max_parallel)


def _submit_stages(wf: Workflow, address: str, runs_dir: Path, only: str | None, force: bool, poll_s: float,
                   out, wf_dir: Path, max_parallel: int | None) -> None:
    from ray.job_submission import JobSubmissionClient

    cwd = Path.cwd().resolve()
    try:
        rel = wf.path.resolve().relative_to(cwd)
    except ValueError:
        raise UserError(f"{wf.path}: the workflow must be inside the working directory {cwd}, which is uploaded") from None
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # connection refused, bad URL: say which address
        raise UserError(f"--address {address}: cannot reach the Ray job server: {str(e).splitlines()[0]}") from None
    dirs = stage_dirs(wf, runs_dir)
    todo, finished = [], set()
    for name in [only] if only else list(wf.stages):
        if not force and is_done(wf.stages[name], dirs[name]):
            print(f"[{name}] finished earlier, skipping", file=out, flush=True)
            finished.add(name)
        else:
            todo.append(name)
    env = {"working_dir": str(cwd), "excludes": EXCLUDES, "env_vars": {LOCK_HELD_ENV: str(wf_dir)}}
    jobs = StageJobs(client, wf, dirs, lambda n: entrypoint(rel, n, runs_dir.resolve(), wf.overrides) + (" --force" if force else ""),
                     env, poll_s, out)
    if only:  # its needs were checked by the job's own `pipeline run --stage`
        finished |= set(wf.stages[only].needs)
    try:
        run_graph(wf, todo, finished, jobs, lambda n: resources(wf.stages[n]), cluster_capacity(address),
                  max_parallel)
    finally:
        if wf.sandbox is not None and todo:  # the stage jobs started one sandbox service per node: stop them
            job_id = submit_when_ready(client, entrypoint="python -m sandbox stop-services", runtime_env=env,
                                       submission_id=f"{wf.name}-stop-sandboxes-{int(time.time() * 1000)}")
            jobs.jobs["stop-sandboxes"] = [job_id, 0]
            jobs.wait_one()


def cluster_capacity(address: str) -> dict[str, float]:
    """CPUs and GPUs of the cluster's live nodes, from the dashboard at `address` (Ray's state API)."""
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], detail=True)
    except Exception as e:
        raise UserError(f"--address {address}: cannot list the cluster's nodes: {str(e).splitlines()[0]}") from None
    return {k: sum(float((n.resources_total or {}).get(k, 0.0)) for n in nodes) for k in ("CPU", "GPU")}


class StageJobs:
    """`pipeline submit`'s launcher: each stage a Ray job; their logs interleave, each line prefixed `[stage]`."""

    def __init__(self, client, wf: Workflow, dirs: dict[str, Path], command, runtime_env: dict, poll_s: float, out):
        self.client, self.wf, self.dirs, self.command, self.env = client, wf, dirs, command, runtime_env
        self.poll_s, self.out = poll_s, out
        self.jobs: dict[str, list] = {}  # stage -> [job id, characters of its log shown]

    def start(self, name: str) -> None:
        cmd = self.command(name)
        job_id = submit_when_ready(self.client, entrypoint=cmd, runtime_env=self.env,
                                   submission_id=f"{self.wf.name}-{name}-{int(time.time() * 1000)}")
        print(f"[{name}] submitted as {job_id}: {cmd}", file=self.out, flush=True)
        self.jobs[name] = [job_id, 0]

    def wait_one(self) -> tuple[str, Exception | None]:
        while True:
            for name, state in list(self.jobs.items()):
                job_id, shown = state
                status = str(self.client.get_job_status(job_id)).split(".")[-1]
                logs = self.client.get_job_logs(job_id)
                for line in logs[shown:].splitlines():
                    print(f"[{name}] {line}", file=self.out, flush=True)
                state[1] = len(logs)
                if status in TERMINAL:
                    del self.jobs[name]
                    print(f"[{name}] {status}", file=self.out, flush=True)
                    return name, None if status == "SUCCEEDED" else self._error(name, job_id, status, logs)
            time.sleep(self.poll_s)

    def _error(self, name: str, job_id: str, status: str, logs: str) -> Exception:
        """The stage's own one-line error (the job's last `error:` line) when it printed one, naming its log."""
        said = [ln.removeprefix("error: ") for ln in logs.splitlines() if ln.startswith("error: ")]
        where = (f"log: {self.dirs[name] / 'stage.log'}; " if name in self.dirs else "") + f"`ray job logs {job_id}`"
        if said:
            code = getattr(self.client.get_job_info(job_id), "driver_exit_code", None)
            return (UserError if code == 2 else StageFailed)(f"{said[-1]}; {where}")
        what = f"stage {name!r} ({self.wf.stages[name].kind})" if name in self.wf.stages else name
        return StageFailed(f"{what}: job {job_id} ended {status}; {where}")


def submit_when_ready(client, timeout_s: float = 300.0, **job) -> str:
    """Submit a job, waiting out a freshly started cluster whose job agent is not up yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise UserError(f"the Ray job server refused the job: {str(e).splitlines()[0]}") from None
            if time.monotonic() > deadline:
                raise UserError(f"the cluster's job agent was not ready within {timeout_s:.0f}s; is every node up?") from None
            log.info("the cluster's job agent is not ready yet; retrying")
            time.sleep(2.0)
