"""The one reward interface, the registry of rewards by name, and a per-sample time limit.

A reward is any callable `reward(samples) -> list[RewardResult]`, one result per sample, in order.
A sample is a plain dict:

    {"id": ..., "domain": "math", "messages": [prompt chat messages],
     "completion": "<think>...</think>The answer is \\boxed{2}", "answer": "2", "meta": {...}}

Rewards score 0.0 with a `reason` where a sample cannot be scored (no gold answer, no code block);
they never raise for a bad completion. The combiner (`rewards.combine`) still guards against those
that do, and against NaN and slow rewards.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

log = logging.getLogger(__name__)

Sample = dict[str, Any]


@dataclass
class RewardResult:
    """One sample's score, why it is what it is where that is not obvious, and reward-specific extras."""

    score: float
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Reward(Protocol):
    name: str

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]: ...


# name -> "module:attribute" of a factory (a class or function taking keyword options), imported on
# first use so that `import rewards` stays cheap (the reward model pulls in torch, code needs Docker).
REWARDS: dict[str, str | Callable[..., Reward]] = {
    "math": "rewards.math_answer:MathReward",
    "format": "rewards.format:FormatReward",
    "instruction": "rewards.instruction:InstructionReward",
    "code": "rewards.code_tests:CodeReward",
    "agent": "rewards.agent:AgentReward",
    "reward_model": "rewards.reward_model:LearnedReward",
}


def register(name: str, factory: Callable[..., Reward]) -> None:
    """Add a reward under `name` (tests and experiments; built-in ones are listed in `REWARDS`)."""
    REWARDS[name] = factory


def reward_factory(name: str) -> Callable[..., Reward]:
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    target = REWARDS[name]
    if isinstance(target, str):
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)
    return target


def make_reward(name: str, **options: Any) -> Reward:
    """Build the reward registered as `name`, passing `options` to its factory.

    >>> make_reward("math", timeout_s=2.0).name
    'math'
    """
    reward = reward_factory(name)(**options)
    if not getattr(reward, "name", None):
        reward.name = name
    return reward


def accepts(factory: Callable, option: str) -> bool:
    """Whether `factory` takes keyword `option` (so the combiner can hand it a default)."""
    params = inspect.signature(factory).parameters
    return option in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class RewardTimeout(Exception):
    """Raised inside a reward when its time limit passes."""


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise `RewardTimeout` inside the block once `seconds` of wall time pass.

    Uses SIGALRM, so it only works on the main thread (where pytest, scripts and Ray's synchronous
    actors run rewards); elsewhere it is a no-op, and the Ray worker's own timeout is the backstop.
    Nests: an inner deadline never extends an outer one. Pure-Python work is interrupted between
    bytecodes; a single long C call (one huge regex) is only interrupted when it returns.

    >>> import time
    >>> with deadline(0.05):
    ...     try:
    ...         time.sleep(1)
    ...     except RewardTimeout:
    ...         print("stopped")
    stopped
    """
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_handler = signal.getsignal(signal.SIGALRM)
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()

    def on_alarm(signum, frame):
        raise RewardTimeout(f"took longer than {seconds:g}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left) if outer_left > 0 else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_left > 0:  # give the outer deadline back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))


def clean_score(value: Any) -> tuple[float, str | None]:
    """A finite float score, or 0.0 and the reason the value was rejected.

    >>> clean_score(float("nan"))
    (0.0, 'reward returned nan')
    """
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0, f"reward returned a non-number: {value!r:.60}"
    if not math.isfinite(x):
        return 0.0, f"reward returned {x}"
    return x, None
