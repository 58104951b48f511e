"""Device and CPU-thread choices for the processes that run models outside a learner group (rollout, eval).

Training plumbing (optimizer, schedule, checkpoints, the worker group) lives in `learner/`.
"""

from __future__ import annotations

import os

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int) -> None:
    """Use `threads` CPU threads (0: every core). Ray caps actors at their CPU share otherwise."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
