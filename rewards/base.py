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

import functools
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
    """What builds reward `name` from its options: a registered name, or a user's `module:attribute`.

    A user's class is its own factory; a user's function `fn(samples, **options)` gets a factory whose
    signature is its keyword options. KeyError for an unknown name, ValueError for a bad import path
    or an object without the reward signature (see `load_custom_reward`).
    """
    if name in REWARDS:
        target = REWARDS[name]
        if isinstance(target, str):
            module, attr = target.split(":")
            return getattr(importlib.import_module(module), attr)
        return target
    if ":" in name:
        return load_custom_reward(name)
    raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}, or `module:attribute`")


def load_custom_reward(path: str) -> Callable[..., Reward]:
    """The factory for a user's reward at `path` ("my_pkg.rewards:exact"); ValueError (one line) if
    the module or attribute is missing or the object does not have the one reward signature.

    A class is constructed with the reward's options, and its instances called with the batch; a
    function (or any other callable) is called as `fn(samples, **options)`.

    >>> reward = load_custom_reward("rewards.format:FormatReward")()
    >>> load_custom_reward("rewards.format:no_such_thing")
    Traceback (most recent call last):
    ...
    ValueError: reward 'rewards.format:no_such_thing': module 'rewards.format' has no attribute 'no_such_thing'
    """
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"reward {path!r}: expected `module:attribute`")
    try:
        target: Any = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"reward {path!r}: cannot import {module!r} ({type(e).__name__}: {e}); it must be "
                         "importable here and in the reward workers (PYTHONPATH or an installed package)") from None
    except Exception as e:  # the user's module raised while importing
        raise ValueError(f"reward {path!r}: importing {module!r} raised {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward {path!r}: module {module!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if inspect.isclass(target):
        call = next((k.__dict__["__call__"] for k in target.__mro__ if "__call__" in k.__dict__), None)
        if call is None:
            raise ValueError(f"reward {path!r}: class {target.__name__} has no __call__(self, samples)")
        _takes_batch(path, call, extra=(None,))
        return target
    if not callable(target):
        raise ValueError(f"reward {path!r}: {type(target).__name__} object is not callable; expected "
                         "reward(samples) -> list[RewardResult] or a class whose instances are")
    params = _takes_batch(path, target)
    options = [p.replace(kind=p.KEYWORD_ONLY) for p in params[1:] if p.kind is not p.VAR_POSITIONAL]

    def factory(**opts: Any) -> Reward:
        reward = functools.partial(target, **opts)
        reward.name = path  # type: ignore[attr-defined]
        return reward  # type: ignore[return-value]

    factory.__signature__ = inspect.Signature(options)  # type: ignore[attr-defined]
    return factory


def _takes_batch(path: str, fn: Callable, extra: tuple = ()) -> list[inspect.Parameter]:
    """`fn`'s parameters, after checking it takes one positional argument, the batch (other required
    parameters must come from the reward's options: `check_options` says so at load time)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return []
    try:
        sig.bind_partial(*extra, [])
    except TypeError as e:
        raise ValueError(f"reward {path!r}: {getattr(fn, '__qualname__', fn)} cannot be called with one batch "
                         f"of samples ({e}); expected reward(samples) -> list[RewardResult]") from None
    return list(sig.parameters.values())[len(extra):]


def make_reward(name: str, **options: Any) -> Reward:
    """Build the reward registered as `name`, passing `options` to its factory.

    >>> make_reward("math", timeout_s=2.0).name
    'math'
    """
    reward = reward_factory(name)(**options)
    if not getattr(reward, "name", None):
        reward.name = name
    return reward


def check_options(name: str, factory: Callable, options: dict[str, Any], require: bool = True) -> None:
    """ValueError (one line) unless `factory(**options)` binds: no unknown option and (`require`) no
    required one missing (built-in rewards get some, like the reward model's path, from the combiner)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for key in options:
            if key not in params:
                raise ValueError(f"{name}: unknown option {key!r}; {name} takes {', '.join(params) or 'none'}")
    required = [k for k, p in params.items() if p.default is p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    missing = [k for k in required if k not in options]
    if require and missing:
        raise ValueError(f"{name}: {missing[0]!r} has no value; a reward is called with one batch of samples, "
                         f"its other parameters come from rewards.options[{name!r}]")


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
