"""Training plumbing shared by every learner (SFT, GRPO, reward model, distillation): functions only."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import torch

from experts.models import save_checkpoint
from pipeline.config import UserError
from pipeline.context import atomic_write_text

STATE_FILE = "trainer_state.pt"


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int) -> None:
    """Use `threads` CPU threads (0: every core). Ray caps actors at their CPU share otherwise."""
    torch.set_num_threads(threads or os.cpu_count() or 1)


def autocast(precision: str, device: torch.device):
    """bf16 autocast on a GPU that has it (`precision: auto` or `bf16`); fp32 everywhere else.

    CPU bf16 matmuls are slower than fp32 on most CPUs, so `auto` keeps fp32 there.
    """
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_ratio` at `total`.

    >>> [round(lr_factor(s, 2, 10, 0.1), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.55, 0.1]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class NonFiniteLoss(UserError):
    """Training diverged: a loss or gradient norm is NaN or infinite. The stage fails, never DONE."""


def check_finite(at: str, **values) -> None:
    """Raise NonFiniteLoss naming `at` (e.g. "step 3") if any value is NaN or infinite.

    Every learner calls this before `optimizer.step()`, so a diverged step never reaches the
    weights or a checkpoint.

    >>> check_finite("step 1", loss=0.5, grad_norm=2.0)
    >>> check_finite("step 3", loss=float("nan"), grad_norm=1.0)
    Traceback (most recent call last):
    ...
    experts.train.NonFiniteLoss: loss is nan at step 3 (grad_norm 1): training diverged; lower lr, or check the data and the starting checkpoint
    """
    values = {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        others = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != bad[0])
        raise NonFiniteLoss(f"{bad[0]} is {values[bad[0]]} at {at}{f' ({others})' if others else ''}: training "
                            f"diverged; lower lr, or check the data and the starting checkpoint")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup: int, total: int, min_ratio: float):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total, min_ratio))
    return opt, sched


def save_train_state(path: Path, model, tokenizer, optimizer, scheduler, step: int, keep: int) -> Path:
    """Checkpoint `checkpoints/step_N`: HF model + tokenizer, plus optimizer/scheduler/RNG state.

    Written atomically, then older checkpoints beyond the newest `keep` are removed.
    """
    ckpt = path / f"step_{step}"
    save_checkpoint(model, tokenizer, ckpt)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    tmp = ckpt / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, ckpt / STATE_FILE)
    atomic_write_text(ckpt / "COMPLETE", json.dumps({"step": step}))
    for old in list_checkpoints(path)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def list_checkpoints(path: Path) -> list[Path]:
    """Complete checkpoints under `path`, oldest first."""
    if not path.exists():
        return []
    found = [p for p in path.iterdir() if re.fullmatch(r"step_\d+", p.name) and (p / "COMPLETE").exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(path: Path) -> Path | None:
    ckpts = list_checkpoints(path)
    return ckpts[-1] if ckpts else None


def load_train_state(ckpt: Path, optimizer, scheduler) -> int:
    """Restore optimizer, scheduler and RNG from `ckpt`; returns the step it was saved at."""
    state = torch.load(Path(ckpt) / STATE_FILE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metrics logged after `step` by a run that died before its next checkpoint."""
    f = out_dir / "metrics.jsonl"
    if f.exists():
        keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(f, "".join(ln + "\n" for ln in keep))
