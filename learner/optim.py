"""Optimizer, schedule and the divergence check shared by every trainer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.config import UserError


@dataclass(frozen=True)
class Optim:
    """AdamW with linear warmup then cosine decay; gradients clipped to `max_grad_norm` before each step."""

    lr: float
    total_steps: int
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    decay: str = "cosine"  # or "linear"


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, decay: str = "cosine") -> float:
    """Linear warmup over `warmup` steps, then cosine (or linear) decay to `min_ratio` at `total`.

    >>> [round(lr_factor(s, 2, 10, 0.1), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.55, 0.1]
    >>> [round(lr_factor(s, 2, 10, 0.0, "linear"), 3) for s in (0, 2, 6, 10)]
    [0.5, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1 - progress if decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * shape


def make_optimizer(model: torch.nn.Module, o: Optim):
    """AdamW over the trainable parameters only (with LoRA, the adapters), and its schedule."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, o.total_steps, o.min_lr_ratio, o.decay))
    return opt, sched


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
    learner.optim.NonFiniteLoss: loss is nan at step 3 (grad_norm 1): training diverged; lower lr, or check the data and the starting checkpoint
    """
    values = {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        others = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != bad[0])
        raise NonFiniteLoss(f"{bad[0]} is {values[bad[0]]} at {at}{f' ({others})' if others else ''}: training "
                            f"diverged; lower lr, or check the data and the starting checkpoint")
