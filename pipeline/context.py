"""What a stage's `run(cfg, ctx)` gets: where to write, where its inputs are, and a metrics log."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # every stage that produces a model writes it, in HF format, to <out_dir>/model


@dataclass
class StageContext:
    """One stage's view of the run.

    out_dir: this stage's artifact directory (`runs/<workflow>/<stage>/`), created before `run`.
    stage_dirs: artifact directories of every stage in the workflow, by name (inputs live there).
    tracker: the workflow's `tracking:` sinks (TensorBoard, W&B, MLflow), fed by `log_metrics`.
    """

    workflow: str
    name: str
    out_dir: Path
    stage_dirs: dict[str, Path] = field(default_factory=dict)
    seed: int = 0
    tracker: Tracker | None = field(default=None, repr=False, compare=False)

    def model_path(self, ref: str) -> Path:
        """Resolve a model reference: a stage name gives that stage's `model/`, a hub id that is not a
        local path its snapshot in the hub cache (`pipeline.hub`, downloading it if need be), anything
        else is a path."""
        from pipeline import hub

        if ref in self.stage_dirs:
            return self.stage_dirs[ref] / MODEL_DIR
        if not Path(ref).exists() and hub.parse_hub_id(ref):
            return hub.resolve(ref)
        return Path(ref)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one line to `metrics.jsonl`, flushed at once so a kill loses nothing logged; then send
        the numbers to the tracking sinks (which never raise: the file is the full record)."""
        line = json.dumps({"step": step, "time": round(time.time(), 3), **metrics}, default=float)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(line + "\n")
            f.flush()
        if self.tracker is not None:
            self.tracker.log(step, metrics)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; rename it to `path` only if the block succeeds.

    A crash leaves a `.tmp` directory that the next attempt removes, never a half-written `path`.
    """
    import shutil

    path = Path(path)
    # Defence in depth: this removes `path` and its temp sibling, so `path` must name one entry of
    # its parent ('x/..' would remove the grandparent) and not be a link to somewhere else.
    if path.name in ("", ".", "..") or path.is_symlink() or Path(path.parent).resolve() / path.name != path.resolve():
        raise ValueError(f"atomic_dir: {path} is not a plain entry of its directory; refusing to replace it")
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


@contextmanager
def timer(name: str, into: dict[str, float]) -> Iterator[None]:
    """`with timer("generate", times):` adds the block's wall time to `times["time/generate"]`."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        key = f"time/{name}"
        into[key] = into.get(key, 0.0) + time.perf_counter() - t0
