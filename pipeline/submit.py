"""Submit each stage of a workflow as its own Ray job, in dependency order, and follow it.

Each job is exactly `ray job submit --working-dir . -- python -m pipeline run FILE --stage NAME`:
the current directory is uploaded as the job's code, and artifacts go to an absolute runs
directory, which must be storage every node sees (on one machine, any local path).
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path

from pipeline.config import UserError, Workflow
from pipeline.runner import LOCK_HELD_ENV, is_done, stage_dirs, workflow_dir, workflow_lock

log = logging.getLogger(__name__)

EXCLUDES = [".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def entrypoint(workflow: Path, stage: str, runs_dir: Path) -> str:
    return f"python -m pipeline run {shlex.quote(str(workflow))} --stage {stage} --runs-dir {shlex.quote(str(runs_dir))}"


def submit_workflow(wf: Workflow, address: str, runs_dir: Path, only: str | None = None,
                    force: bool = False, poll_s: float = 1.0, out=sys.stdout) -> None:
    """Submit the stages one job each, stream their logs, and stop at the first failure.

    The driver holds the workflow's lock for the whole submission, as `run` does, so a second
    `submit` or `run` of the workflow is refused. Each job's inner `pipeline run --stage` is told
    (PIPELINE_LOCK_HELD in its environment) that its driver holds the lock, rather than taking it
    itself: the driver waits on that job, so a job waiting on the driver's lock would never start.
    """
    if only is not None and only not in wf.stages:
        raise UserError(f"{wf.path}: --stage {only!r}: no such stage; stages are {', '.join(wf.stages)}")
    wf_dir = workflow_dir(wf, runs_dir)
    with workflow_lock(wf_dir):
        _submit_stages(wf, address, runs_dir, only, force, poll_s, out, wf_dir)


def _submit_stages(wf: Workflow, address: str, runs_dir: Path, only: str | None, force: bool, poll_s: float,
                   out, wf_dir: Path) -> None:
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
    for name in [only] if only else list(wf.stages):
        if not force and is_done(wf.stages[name], dirs[name]):
            print(f"[{name}] finished earlier, skipping", file=out, flush=True)
            continue
        cmd = entrypoint(rel, name, runs_dir.resolve()) + (" --force" if force else "")
        job_id = submit_when_ready(
            client,
            entrypoint=cmd,
            runtime_env={"working_dir": str(cwd), "excludes": EXCLUDES, "env_vars": {LOCK_HELD_ENV: str(wf_dir)}},
            submission_id=f"{wf.name}-{name}-{int(time.time())}",
        )
        print(f"[{name}] submitted as {job_id}: {cmd}", file=out, flush=True)
        status = follow(client, job_id, name, poll_s, out)
        if status != "SUCCEEDED":
            raise UserError(f"stage {name!r} failed: job {job_id} ended {status}; see `ray job logs {job_id}`")
        print(f"[{name}] {status}", file=out, flush=True)


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


def follow(client, job_id: str, name: str, poll_s: float, out) -> str:
    """Print the job's new log lines until it ends; returns its final status."""
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        for line in logs[shown:].splitlines():
            print(f"[{name}] {line}", file=out, flush=True)
        shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
