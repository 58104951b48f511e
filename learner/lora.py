"""LoRA (the `peft` package) for a learner: low-rank adapters on chosen linear layers, the rest frozen.

`learner.lora` in a stage's config turns it on. The adapters are injected into the Hugging Face
model in place (`peft.inject_adapter_in_model`), so the learner's root module stays the HF model:
FSDP2 shards the same decoder layers, objectives call it the same way, and its parameter names are
the base model's with `.base_layer` and `.lora_A/B.default` inserted. Only the adapters train, and
only they enter the optimizer and the resumable checkpoints (the frozen base comes from the stage's
starting model again on resume).

Everything that leaves the learner as weights is merged (W + scale * B @ A, scale = alpha / r) under
the base model's names: the weight sync to rollout engines, the final `model/`, a driver's copy.
So rollout engines, later stages and `AutoModelForCausalLM` never see peft.

Shortcut: only `nn.Linear` targets (peft's `fan_in_fan_out` layers, GPT-2's Conv1D, are not merged
right here); peft refuses other module kinds when it injects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import UserError

ADAPTER = "default"  # peft's adapter name: the only adapter a learner has


class LoraConfig(BaseModel):
    """Low-rank adapters: each target linear layer W becomes W + (alpha / r) * B @ A, and only A and B train."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    r: int = Field(8, ge=1, le=65536, description="Rank of each adapter (A is r x in, B is out x r).")
    alpha: float = Field(16.0, gt=0, le=1e6, description="Scale numerator: the update B @ A is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
                                      description="Linear layers that get adapters, by name suffix (peft's "
                                                  "target_modules), e.g. q_proj, v_proj, up_proj.")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def add_adapters(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """`model` with LoRA adapters injected in place and only they trainable (A random, B zero: the same
    function as before). The init is seeded, so every rank (and every number of ranks) starts alike."""
    import peft

    pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=list(cfg.target_modules))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            peft.inject_adapter_in_model(pcfg, model, adapter_name=ADAPTER)
        except ValueError as e:  # e.g. no module matches a target name
            raise UserError(f"learner.lora.target_modules {list(cfg.target_modules)}: {e}") from None
    return model


def has_adapters(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """Inside, `model` computes with its base weights only (what peft's `disable_adapter()` does, and TRL
    uses for the reference policy): no second copy of the model. Adapters' requires_grad is restored after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def without_adapters(model: torch.nn.Module, mb: dict, fn: Callable) -> torch.Tensor:
    """`fn(model, mb)` with the adapters off: a learner `forward` function (bind `fn` with functools.partial)."""
    with adapters_off(model):
        return fn(model, mb)


def merge_adapters(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The same weights under the base model's names: each adapted `weight` is W + scale * B @ A (in float32,
    then back to W's dtype), its bias passes through, the adapters themselves are dropped.

    Works on any subset of a state dict that holds each adapted layer whole (a sync bucket holds whole
    decoder layers).

    >>> sd = {"q.base_layer.weight": torch.zeros(2, 2), "q.base_layer.bias": torch.ones(2),
    ...       "q.lora_A.default.weight": torch.ones(1, 2), "q.lora_B.default.weight": torch.tensor([[1.0], [2.0]]),
    ...       "norm.weight": torch.ones(2)}
    >>> {k: v.tolist() for k, v in merge_adapters(sd, 0.5).items()}
    {'q.weight': [[0.5, 0.5], [1.0, 1.0]], 'q.bias': [1.0, 1.0], 'norm.weight': [1.0, 1.0]}
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if f".lora_A.{ADAPTER}." in k or f".lora_B.{ADAPTER}." in k:
            continue
        if ".base_layer." not in k:
            out[k] = v
            continue
        module, leaf = k.split(".base_layer.")
        if leaf == "weight":
            a, b = state[f"{module}.lora_A.{ADAPTER}.weight"], state[f"{module}.lora_B.{ADAPTER}.weight"]
            v = (v.float() + scale * (b.float() @ a.float())).to(v.dtype)
        out[f"{module}.{leaf}"] = v
    return out
