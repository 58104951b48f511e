"""The `learner:` block every training stage has: how many workers, where, sharded how, in what dtype, full
fine-tuning or LoRA."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from learner.lora import LoraConfig


class LearnerConfig(BaseModel):
    """How a stage's trainer runs: a group of `workers` Ray actors joined by torch.distributed.

    `workers: 1` is the same code path as many: one rank, a process group of one, the same sharding.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    workers: int = Field(1, ge=1, le=4096, description="Ray actors (ranks) in the group; each takes a share of "
                                                       "every batch, balanced by tokens.")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="CPUs each worker reserves in Ray.")
    gpus_per_worker: float = Field(0.0, ge=0, le=16, description="GPUs each worker reserves (0: CPU training; "
                                                                  "with GPUs the group talks NCCL, else gloo).")
    threads: int = Field(0, ge=0, le=4096, description="torch CPU threads per worker (0: its CPU share, at least 1).")
    strategy: Literal["fsdp2", "ddp"] = Field("fsdp2", description="fsdp2: parameters, gradients and optimizer "
                                              "state sharded over ranks (fully_shard per decoder layer, then the "
                                              "root); ddp: every rank holds all of them, gradients all-reduced.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Dtype the weights are loaded and kept "
                                                  "in (and the optimizer state).")
    mixed_precision: bool = Field(False, description="fsdp2 on GPU: bf16 compute with fp32 gradient reduction "
                                                     "over float32 weights. Ignored on CPU.")
    activation_checkpointing: bool = Field(False, description="Recompute each decoder layer's activations in "
                                                              "backward: less memory, ~30% more compute.")
    placement: Literal["pack", "spread"] = Field("pack", description="pack: as few nodes as fit; spread: one "
                                                 "worker per node (Ray STRICT_SPREAD).")
    collective_timeout_s: float = Field(600.0, gt=0, le=86400, description="Timeout of every collective; a rank "
                                        "that stops answering fails the step instead of hanging it.")
    lora: LoraConfig | None = Field(None, description="LoRA adapters (peft) instead of full fine-tuning, e.g. {r: 8, "
                                    "alpha: 16, target_modules: [q_proj, v_proj]}: only they train; the weights synced "
                                    "to rollouts and the saved model are merged. sft and grpo only. None: all weights train.")

    def resources(self, cpu_share: float = 1.0) -> dict[str, float]:
        """Ray resources the whole group holds; `cpu_share` scales each worker's CPUs (a reference copy: 1/4)."""
        return {"CPU": self.workers * self.cpus_per_worker * cpu_share, "GPU": self.workers * self.gpus_per_worker}


def whole_model(cfg: LearnerConfig) -> LearnerConfig:
    """A pydantic validator for stages that train their whole model (OPD's student, the reward model's
    head): `learner.lora` is refused when the workflow loads, not when the learner starts."""
    if cfg.lora is not None:
        raise ValueError("learner.lora is for sft and grpo; this stage trains its whole model (remove learner.lora)")
    return cfg
