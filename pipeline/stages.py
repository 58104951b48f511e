"""The stage kinds a workflow may name. Each module has `Config` (pydantic) and `run(cfg, ctx)`."""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES: dict[str, str] = {
    "base_model": "experts.base_model",
    "sft": "experts.sft",
    "grpo": "experts.grpo",
    "eval": "experts.eval",
    "opd": "distill.opd",
    "reward_model": "experts.reward_model",
}


def stage_module(kind: str) -> ModuleType:
    return importlib.import_module(STAGES[kind])


def resources(stage) -> dict[str, float]:
    """The Ray resources `stage` holds at once at most (its module's `resources(cfg)`; none declared: {})."""
    declared = getattr(stage_module(stage.kind), "resources", None)
    return dict(declared(stage.config)) if declared else {}
