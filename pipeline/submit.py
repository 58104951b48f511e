"""Submit each stage of a workflow as its own Ray job, in dependency order, and follow it.

Each job is exactly `ray job submit --working-dir . -- python -m pipeline run FILE --stage NAME`:
the current directory is uploaded as the job's code, and artifacts go to an absolute runs
directory, which must be storage every node sees (on one machine, any local path).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from pipeline.config import UserError, Workflow
from pipeline.runner import is_done, stage_dirs

log = logging.getLogger(__name__)

EXCLUDES = [".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def entrypoint(workflow: Path, stage: str, runs_dir: Path) -> str:
    return f"python -m pipeline run {workflow} --stage {stage} --runs-dir {runs_dir}"


def submit_workflow(wf: Workflow, address: str, runs_dir: Path, only: str | None = None,
                    force: bool = False, poll_s: float = 1.0, out=sys.stdout) -> None:
    """Submit the stages one job each, stream their logs, and stop at the first failure."""
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
            runtime_env={"working_dir": str(cwd), "excludes": EXCLUDES},
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
