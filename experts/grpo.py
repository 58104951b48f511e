"""Stage `grpo`: push one domain expert to its peak with GRPO against its domain's rewards.

Set-up (samples, prompt plan, actors), one loop of steps, save. Each step:

    generate  rollout actors sample G responses per prompt (agent prompts: sandbox episodes)
    score     reward actors score them (`rewards.RewardSpec`); overlong shaping; group advantages;
              with dynamic sampling, more prompts are generated and scored while too few groups are
              informative (`rollout_groups`; which prompts: `PromptPlan`)
    train     epochs x mini-batches of clipped updates, each token weighted by truncated IS when the
              rollout engine differs from the learner (old log-probs get their own forward pass
              only when there is more than one update per batch: with one, they are the update's own)
    sync      new weights stream to the rollout actors layer by layer; a probe batch proves they arrived

Ray actors are thin shells over plain classes: `RolloutWorker` (rollout.worker), `GRPOLearner`
and `ReferencePolicy` (here; the reference is skipped when `kl_coef` is 0, and with `learner.lora` it
is the learner's own base weights, adapters off: `BaseWeightsReference`), `RayRewardPool`
(rewards.workers). The math lives in `experts.grpo_loss`; docs/grpo.md lists every choice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from experts.data import GENERATING, DataConfig, check_mix, domain_plan, fresh_samples, load_samples, prompt_key
from experts.grpo_loss import (
    KLEstimator,
    LossAgg,
    RewardScale,
    entropy_from_logits,
    group_advantages,
    informative_groups,
    next_token_logprobs,
    overlong_penalty,
    policy_loss,
    token_logprobs,
    truncated_is_weights,
)
from experts.models import load_tokenizer
from learner.batching import batch_plan
from learner.checkpoint import checkpoint_step, latest_checkpoint, truncate_metrics
from learner.config import LearnerConfig
from learner.group import WorkerGroup
from learner.lora import without_adapters
from learner.optim import Optim
from pipeline.config import MAX_BATCH, MAX_TOKENS, BatchSize, LearningRate, ModelRef, StageConfig, Steps
from pipeline.context import MODEL_DIR, StageContext, atomic_write_text, timer
from rewards import CombinedReward, RewardResult, RewardSpec
from rewards.combine import reward_failed
from rollout.config import AgentConfig, RolloutConfig
from rollout.sync import sync_weights
from rollout.turns import render_prompt
from rollout.types import Rollout
from rollout.worker import generate_on, start_workers, stop_workers
from sandbox.service import service_metrics

log = logging.getLogger(__name__)


class Config(StageConfig):
    model: ModelRef = Field(description="Starting checkpoint (usually the domain's SFT stage).")
    ref_model: ModelRef | None = Field(None, description="Reference policy for the KL term; None: `model` (with "
                                       "learner.lora: the learner's base weights, adapters off, no second copy).")
    data: list[DataConfig] = Field(default_factory=lambda: [DataConfig()], description="Prompts (train split): "
                                   "the expert's domain, or a list of domains trained at once (a mixed model; give "
                                   "`rewards.domains` and `rollout.domains` so each is scored and sampled as its own).")
    rewards: RewardSpec = Field(default_factory=RewardSpec, description="Which rewards score a response, with weights.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="How responses are sampled.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="Multi-turn episodes (domain: agent).")
    steps: Steps = Field(100, description="GRPO steps: one rollout batch and its updates each (at most 1,000,000).")
    prompts_per_step: BatchSize = Field(8, description="Prompts per step; each gets rollout.group_size responses. "
                                                       "prompts_per_step x group_size is at most 65,536.")
    lr: LearningRate = Field(1e-5, description="Learning rate (AdamW), in (0, 1]; ~1e-6 for billion-parameter models, ~1e-4 for tiny ones.")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Linear warmup, in optimizer updates.")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="Cosine decay to lr * this; 1.0 keeps the LR constant (the usual RL choice).")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay (at most 10).")
    max_grad_norm: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    epochs: int = Field(1, ge=1, le=1000, description="Passes over each rollout batch.")
    mini_batches: BatchSize = Field(1, description="Optimizer updates per pass; past the first, the ratio departs from 1 and clipping acts.")
    micro_batch_size: BatchSize = Field(16, description="Sequences per forward/backward (gradient accumulation inside a mini-batch).")
    clip_low: float = Field(0.2, ge=0, lt=1, description="Ratio floor 1 - clip_low for negative advantages (PPO's epsilon).")
    clip_high: float = Field(0.28, ge=0, description="Ratio ceiling 1 + clip_high for positive advantages (DAPO clip-higher: above clip_low).")
    kl_coef: float = Field(0.0, ge=0, le=1000, description="Weight of the KL-to-reference term (kl_estimator); 0 (DAPO, Dr. GRPO) skips the reference actor.")
    kl_estimator: KLEstimator = Field(
        "k2", description="Per-token KL term: k2 = (log pi - log ref)^2 / 2, whose expected gradient is that of "
        "KL(pi || ref); k3 (DeepSeekMath's) has the gradient of the reverse KL(ref || pi); k1 = log pi - log ref has "
        "none (Tang & Munos 2025). The `kl` metric is the chosen estimator's mean.")
    loss_agg: LossAgg = Field("token_mean", description="token_mean (DAPO): every response token weighs the same; seq_mean: mean per response, then over responses (GRPO).")
    scale_rewards: RewardScale = Field(
        "group", description="Group-centred rewards divided by: group: the group's std (GRPO); batch: the std of "
        "every reward the step trains on (robust when a group's rewards differ only slightly); none: nothing (Dr. GRPO).")
    tie_tolerance: float = Field(1e-6, ge=0, le=1000, description="Rewards of a group within this of each other are "
                                 "tied: no signal, advantage 0 (dropped by dynamic_sampling); raise it for a noisy "
                                 "continuous reward (a reward model).")
    dynamic_sampling: bool = Field(True, description="Train only on informative groups (rewards not all tied); DAPO.")
    max_refill_calls: int = Field(2, ge=0, le=100, description="dynamic_sampling: extra generate calls per step on "
                                  "new prompts while fewer than prompts_per_step groups are informative (DAPO's "
                                  "re-sampling); 0 only drops.")
    mix: dict[str, float] = Field(default_factory=dict, description="Domain -> share of every step's prompts, e.g. "
                                  "{math: 4, code: 1} (normalised), as sft.mix: a mixed model's steps can hold each "
                                  "domain as its expert's did. Empty: prompts drawn from all samples alike (fresh_"
                                  "prompts: in proportion to each source's size).")
    domain_quotas: bool = Field(False, description="With `mix` and dynamic_sampling: each domain trains at most as "
                                "many groups as the step planned for it, and refills draw only the domains short of "
                                "that, as each domain's own expert would; without it a domain whose groups tie hands "
                                "its slots to whichever domain is still learning.")
    fresh_prompts: bool = Field(False, description="Each step draws new problems from the data's generators (source "
                                "generator or reasoning_gym; seeds from data.seed and the step; never a held-out "
                                "prompt) instead of walking the fixed train split.")
    skip_uninformative_after: int = Field(0, ge=0, le=1_000_000, description="Retire a prompt whose group was tied "
                                          "(all solved or all failed) in each of its last k appearances: later draws "
                                          "pass it over and the next prompt takes its place. 0: off.")
    overlong: Literal["none", "penalty", "filter"] = Field(
        "filter", description="Responses cut by their budget (a single turn's domain max_new_tokens, an agent episode's "
        "agent.max_total_tokens): filter masks them out of the loss; penalty adds DAPO's soft length penalty.")
    overlong_buffer: int = Field(16, ge=1, le=MAX_TOKENS, description="penalty: the last N tokens before the budget ramp the penalty from 0 to overlong_penalty.")
    overlong_penalty: float = Field(1.0, ge=0, le=1000, description="penalty: reward lost by a response that uses its whole budget.")
    save_every: Steps = Field(50, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Newest checkpoints kept on disk.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Workers, sharding and dtype of the "
                                   "policy's trainer (and of the reference, when kl_coef > 0); micro_batch_size "
                                   "is per worker.")
    reward_workers: int = Field(1, ge=0, le=1024, description="Reward actors; 0 scores in the driver process.")
    reward_cpus: float = Field(0.25, gt=0, le=4096, description="CPUs each reward actor reserves.")
    probe_prompts: int = Field(4, ge=1, le=1024, description="Prompts in the probe batch that checks each weight sync.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "scale_adv_by_std" in data:
            new = "group" if data["scale_adv_by_std"] else "none"
            raise ValueError(f"scale_adv_by_std is now scale_rewards (group, batch or none): write scale_rewards: {new}")
        return data

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, (dict, DataConfig)) else v

    @model_validator(mode="after")
    def _mix_names_domains(self):
        check_mix(self.mix, self.data)
        return self

    @model_validator(mode="after")
    def _quotas_need_a_mix(self):
        if self.domain_quotas and not self.mix:
            raise ValueError("domain_quotas: true needs `mix` (each domain's share of a step is its quota)")
        return self

    @model_validator(mode="after")
    def _fresh_needs_generators(self):
        for i, d in enumerate(self.data if self.fresh_prompts else []):
            if d.source not in GENERATING:
                raise ValueError(f"fresh_prompts: data.{i} has source {d.source!r}, which cannot make new problems; "
                                 f"use source {' or '.join(GENERATING)}, or fresh_prompts: false")
        return self

    @model_validator(mode="after")
    def _rollout_fits(self):
        """The rollout's own config (rollout.config) is bounded here, where its sizes multiply."""
        ro = self.rollout
        if ro.group_size < 2:
            raise ValueError(f"rollout.group_size is {ro.group_size}; GRPO's advantages need at least 2 responses per prompt")
        if ro.temperature == 0:
            raise ValueError("rollout.temperature is 0 (greedy): GRPO needs sampled responses that differ")
        for field, value, most in (
            ("prompts_per_step x rollout.group_size", self.prompts_per_step * ro.group_size, MAX_BATCH),
            ("rollout.max_new_tokens", ro.longest(), MAX_TOKENS),
            ("rollout.think_budget", ro.think_budget, MAX_TOKENS),
            ("rollout.batch_size", ro.batch_size, MAX_BATCH),
            ("rollout.num_workers", ro.num_workers, 1024),
            ("agent.max_total_tokens", self.agent.max_total_tokens, MAX_TOKENS),
            ("agent.max_turns", self.agent.max_turns, 1024),
            ("agent.sandboxes", self.agent.sandboxes, 1024),
        ):
            if value > most:
                raise ValueError(f"{field} is {value}; at most {most}")
        return self


def collate_rollouts(rollouts: list[Rollout], advantages: list[float], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training rows: prompt + response, with masks aligned to next-token targets.

    input_ids, attention_mask: [B, L]; loss_mask, rollout_logp: [B, L-1] (position j scores token
    j+1); advantages: [B]. Prompt and padding positions have loss_mask 0.
    """
    rows = [r.prompt_ids + r.response_ids for r in rollouts]
    L = max(map(len, rows))
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1))
    rlp = torch.zeros((B, L - 1))
    for i, (r, row) in enumerate(zip(rollouts, rows)):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = 1
        p, n = len(r.prompt_ids), len(r.response_ids)
        mask[i, p - 1 : p - 1 + n] = torch.tensor(r.loss_mask, dtype=torch.float)
        rlp[i, p - 1 : p - 1 + n] = torch.tensor(r.logprobs, dtype=torch.float)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask, "rollout_logp": rlp,
            "advantages": torch.tensor(advantages, dtype=torch.float)}


def grpo_loss(model, mb: dict[str, torch.Tensor], *, temperature: float, clip_low: float, clip_high: float,
              loss_agg: LossAgg, kl_coef: float, tis_cap: float | None,
              kl_estimator: KLEstimator = "k2") -> tuple[torch.Tensor, dict[str, float]]:
    """The learner objective: the clipped surrogate summed over the micro-batch (the group divides by the
    mini-batch's tokens or sequences), with token-weighted sums of its statistics.

    Without `old_logp` in the micro-batch (one update per rollout batch) the old policy is this very
    forward pass, detached: ratio 1, no clipping, and the same gradient as with a second pass.
    Logits are made only from the first trained position on (`logits_to_keep`): the prompt's are
    never used, and the LM head over them is a large share of a small model's step.
    """
    ids, m = mb["input_ids"], mb["loss_mask"]
    scored = m.any(0).nonzero()
    start = int(scored[0]) if len(scored) else 0  # first next-token column any row trains on
    cut = {k: mb[k][:, start:] for k in ("old_logp", "rollout_logp", "ref_logp") if k in mb}
    m = m[:, start:]
    logits = model(input_ids=ids, attention_mask=mb["attention_mask"], logits_to_keep=ids.shape[1] - start).logits
    logp = token_logprobs(logits[:, :-1], ids[:, start + 1:], temperature)
    old = cut["old_logp"] if "old_logp" in cut else logp.detach()
    w = truncated_is_weights(old, cut["rollout_logp"], tis_cap) if tis_cap is not None else None
    loss, st = policy_loss(logp, old, mb["advantages"], m, clip_low, clip_high, loss_agg,
                           ref_logp=cut.get("ref_logp"), kl_coef=kl_coef, normaliser=1.0, is_weights=w,
                           kl_estimator=kl_estimator)
    n = float(m.sum())
    with torch.no_grad():
        ent = float((entropy_from_logits(logits[:, :-1].detach(), temperature) * m).sum())
        gap = (old - cut["rollout_logp"]).abs() * m  # rollout engine vs learner, on trained tokens
        out = {"tokens": n, "entropy": ent, "clip_frac": float(st["clip_frac"]) * n, "kl": float(st["kl"]) * n,
               "logp_gap": float(gap.sum()), "max/logp_gap": float(gap.max()) if gap.numel() else 0.0}
        if w is not None:
            out["tis/capped"] = float(((w >= tis_cap) * m).sum())
            out["tis/weight"] = float((w * m).sum())
    return loss, out


def sequence_logprobs(group: WorkerGroup, batch: dict[str, torch.Tensor], cfg: Config) -> torch.Tensor:
    """log pi of every next token of `batch` at the rollout temperature, [B, L-1], on `group`'s workers."""
    fn = functools.partial(next_token_logprobs, temperature=cfg.rollout.temperature)
    return group.forward(batch, fn, cfg.micro_batch_size)


class ReferencePolicy:
    """The frozen reference policy as a learner group without an optimizer: only log-probs, for the KL term."""

    def __init__(self, model_path: str, cfg: Config, local: bool = False):
        self.cfg = cfg
        # Same workers and sharding as the learner; a quarter of its CPUs, since it only runs forward
        # passes and the phases of a step run one at a time (2 cores hold the whole stage).
        ref = cfg.learner.model_copy(update={"cpus_per_worker": cfg.learner.cpus_per_worker / 4, "lora": None})
        self.group = WorkerGroup(model_path, ref, None, name="grpo reference", local=local)

    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logprobs(self.group, batch, self.cfg)

    def close(self) -> None:
        self.group.close()


def reference_is_base(cfg: Config) -> bool:
    """With LoRA and no other reference model, the reference policy is the learner's base weights."""
    return cfg.learner.lora is not None and cfg.ref_model in (None, cfg.model)


class BaseWeightsReference:
    """The reference policy of a LoRA learner: its own frozen base weights, adapters off for the forward
    (TRL's `disable_adapter()`), so no second model is loaded and no reference group is started."""

    def __init__(self, learner: GRPOLearner):
        self.learner = learner

    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.learner.cfg
        fn = functools.partial(without_adapters, fn=functools.partial(next_token_logprobs,
                                                                      temperature=cfg.rollout.temperature))
        return self.learner.group.forward(batch, fn, cfg.micro_batch_size)

    def close(self) -> None:
        pass  # the learner's group: closed by its owner


class GRPOLearner:
    """The policy's trainer (a learner group); one `train_step` is one GRPO step's updates on one rollout batch.

    Called by the stage (the single controller); how many workers hold the policy is the group's business.
    """

    def __init__(self, model_path: str, cfg: Config, resume_from: str | None = None, seed: int = 0,
                 local: bool = False):
        self.cfg, self.seed = cfg, seed
        total = cfg.steps * cfg.epochs * cfg.mini_batches
        optim = Optim(lr=cfg.lr, total_steps=total, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                      min_lr_ratio=cfg.min_lr_ratio, max_grad_norm=cfg.max_grad_norm)
        self.group = WorkerGroup(model_path, cfg.learner, optim, resume=resume_from, name="grpo learner", local=local)
        self.tokenizer_path = model_path
        self.step = checkpoint_step(resume_from) if resume_from else 0  # checkpoints are named by GRPO step

    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logprobs(self.group, batch, self.cfg)

    def train_step(self, batch: dict[str, torch.Tensor] | None, ref_logp: torch.Tensor | None = None) -> dict[str, float]:
        """`epochs` x `mini_batches` clipped updates on one rollout batch; None: no update this step."""
        cfg = self.cfg
        self.step += 1
        if batch is None or batch["input_ids"].shape[0] == 0:
            return {"updates": 0}
        full = dict(batch)
        if cfg.epochs * cfg.mini_batches > 1:  # later updates need pi_old from before the first one
            full["old_logp"] = self.logprobs(batch)
        if ref_logp is not None:
            full["ref_logp"] = ref_logp
        objective = functools.partial(grpo_loss, temperature=cfg.rollout.temperature, clip_low=cfg.clip_low,
                                      clip_high=cfg.clip_high, loss_agg=cfg.loss_agg, kl_coef=cfg.kl_coef,
                                      tis_cap=cfg.rollout.cap(), kl_estimator=cfg.kl_estimator)
        B = batch["input_ids"].shape[0]
        g = torch.Generator().manual_seed(self.seed * 7919 + self.step)
        sums: dict[str, float] = defaultdict(float)
        gap: dict[str, float] = defaultdict(float)  # over the first epoch: each trained token once, before it moved
        updates = 0
        for epoch in range(cfg.epochs):
            order = torch.randperm(B, generator=g)
            for mb in order.split(math.ceil(B / cfg.mini_batches)):
                sub = {k: v[mb] for k, v in full.items()}
                norm = float(sub["loss_mask"].sum().clamp(min=1)) if cfg.loss_agg == "token_mean" else float(len(mb))
                out = self.group.train_step(sub, objective, norm, cfg.micro_batch_size, label=f"step {self.step}")
                tokens = max(out["tokens"], 1.0)
                sums["loss"] += out["loss"] / norm
                for k in ("clip_frac", "kl", "entropy"):
                    sums[k] += out[k] / tokens
                sums["grad_norm"] += out["grad_norm"]
                lr = out["lr"]
                updates += 1
                if epoch == 0:
                    for k in ("tokens", "logp_gap", "tis/capped", "tis/weight"):
                        gap[k] += out.get(k, 0.0)
                    gap["max"] = max(gap["max"], out["max/logp_gap"])
        n = max(gap["tokens"], 1.0)
        m = {k: v / updates for k, v in sums.items()}
        m.update({"lr": lr, "updates": updates, "tokens": gap["tokens"],
                  "logp_gap/rollout_vs_learner": gap["logp_gap"] / n, "logp_gap/max": gap["max"]})
        if cfg.rollout.cap() is not None:
            m.update({"tis/capped_frac": gap["tis/capped"] / n, "tis/weight_mean": gap["tis/weight"] / n})
        return m

    def save(self, checkpoint_dir: str) -> str:
        return str(self.group.save(checkpoint_dir, self.step, self.cfg.keep_checkpoints))

    def save_final(self, path: str) -> str:
        return str(self.group.save_hf(path, self.tokenizer_path))

    def close(self) -> None:
        self.group.close()


Signal = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # rewards [groups, G], counted [groups, G], informative [groups]


def token_budget(rollout: Rollout, cfg: Config) -> int:
    """The tokens a rollout may use after its prompt: an agent episode's total, else its domain's max_new_tokens."""
    return cfg.agent.max_total_tokens if rollout.episode is not None else cfg.rollout.for_domain(rollout.domain).max_new_tokens


def group_signal(rollouts: list[Rollout], results: list[RewardResult], cfg: Config) -> Signal:
    """Per group (G consecutive rollouts per prompt): its rewards after overlong shaping, which of them
    count (the reward did not fail: `rewards.combine.reward_failed`), and whether it is informative
    (at least 2 counted rewards, not all within `tie_tolerance`).

    DAPO's overlong penalty compares each response with its own budget (`token_budget`).
    """
    G = cfg.rollout.group_size
    rewards = torch.tensor([r.score for r in results], dtype=torch.float)
    if cfg.overlong == "penalty":
        used = torch.tensor([len(r.response_ids) for r in rollouts])  # forced and tool tokens use the budget too
        budgets = torch.tensor([token_budget(r, cfg) for r in rollouts])
        rewards = rewards + overlong_penalty(used, budgets, cfg.overlong_buffer, cfg.overlong_penalty)
    counted = torch.tensor([not reward_failed(r) for r in results], dtype=torch.bool).view(-1, G)
    rewards = rewards.view(-1, G)
    return rewards, counted, informative_groups(rewards, counted, cfg.tie_tolerance)


def score_and_advantages(rollouts: list[Rollout], results: list[RewardResult], cfg: Config) -> tuple[list[int], list[float], dict]:
    """The rows to train on and their advantages; returns (kept rollout indices, their advantages, metrics).

    A sample whose reward failed counts nowhere: not in its group's mean and std, not in the loss
    (a made-up 0 would teach the policy something false); a group with fewer than 2 counted samples
    trains nothing. With dynamic sampling only informative groups train, the first
    `prompts_per_step` of them (`domain_quotas`: the first of each domain, up to its quota); a tied
    group's advantages are 0. `overlong: filter` then drops the
    responses that ran out of budget (`finished` False).
    """
    rewards, counted, informative = group_signal(rollouts, results, cfg)
    if cfg.dynamic_sampling and cfg.domain_quotas:
        train = within_quotas(group_domains(rollouts, rewards.shape[1]), informative, cfg.prompts_per_step)
    elif cfg.dynamic_sampling:
        train = informative & (informative.cumsum(0) <= cfg.prompts_per_step)
    else:
        train = counted.sum(-1) >= 2
    rows = counted & train[:, None]
    adv = (group_advantages(rewards, cfg.scale_rewards, rows) * informative[:, None]).flatten()
    keep = rows.flatten()
    lengths = torch.tensor([sum(r.loss_mask) for r in rollouts])
    truncated = torch.tensor([not r.finished for r in rollouts], dtype=torch.bool)
    if cfg.overlong == "filter":
        keep &= ~truncated
    idx = keep.nonzero().flatten().tolist()
    scored = rewards[counted]
    learned = train & informative  # groups whose advantages are not all 0
    metrics = {
        "reward/mean": float(scored.mean()) if len(scored) else 0.0,
        "reward/std": float(scored.std()) if len(scored) > 1 else 0.0,
        "groups/total": float(len(rewards)), "groups/informative": float(learned.sum()),
        "groups/zero_variance_dropped": float(((counted.sum(-1) >= 2) & ~informative).sum()) if cfg.dynamic_sampling else 0.0,
        "rollouts/reward_failed": float((~counted).sum()), "rollouts/trained": float(len(idx)),
        "response/length_mean": float(lengths.float().mean()) if len(lengths) else 0.0,
        "response/length_max": float(lengths.max()) if len(lengths) else 0.0,
        "response/truncated_frac": float(truncated.float().mean()) if len(truncated) else 0.0,
    }
    if len({d.domain for d in cfg.data}) > 1:  # a mixed model: how each domain fares, and its part of the update
        flat, scored_rows = rewards.flatten(), counted.flatten()
        weight = (adv.abs() * lengths).where(keep, torch.zeros(()))  # each row's weight in a token_mean loss
        total = max(float(weight.sum()), 1e-12)
        for d in sorted({r.domain for r in rollouts}):
            mine = torch.tensor([r.domain == d for r in rollouts])
            hits = flat[mine & scored_rows]
            metrics[f"domain/{d}/reward_mean"] = float(hits.mean()) if len(hits) else 0.0
            metrics[f"domain/{d}/length_mean"] = float(lengths[mine].float().mean())
            metrics[f"domain/{d}/rollouts"] = float(mine.sum())
            metrics[f"domain/{d}/groups_informative"] = float((learned & mine.view(rewards.shape)[:, 0]).sum())
            metrics[f"domain/{d}/update_share"] = float(weight[mine].sum()) / total
    return idx, [float(adv[i]) for i in idx], metrics


def group_domains(rollouts: list[Rollout], G: int) -> list[str]:
    """Each group's domain (a step's rollouts come G to a group, in group order)."""
    return [rollouts[g].domain for g in range(0, len(rollouts), G)]


def step_quotas(domains: list[str], P: int) -> Counter:
    """`domain_quotas`: each domain's count among the step's own P prompts, the first P groups (refills
    come after them)."""
    return Counter(domains[:P])


def within_quotas(domains: list[str], informative: torch.Tensor, P: int) -> torch.Tensor:
    """The informative groups that train under `domain_quotas`: each domain's first informative groups,
    up to its quota (`step_quotas`).  -> bool [groups]

    >>> within_quotas(["m", "m", "c", "c", "c"], torch.tensor([False, True, True, True, True]), P=3).tolist()
    [False, True, True, False, False]
    """
    quota, used = step_quotas(domains, P), Counter()
    train = []
    for d, useful in zip(domains, informative.tolist()):
        train.append(useful and used[d] < quota[d])
        used[d] += train[-1]
    return torch.tensor(train, dtype=torch.bool)


def rollout_groups(cfg: Config, take: Callable[..., list[dict]], generate: Callable[[list[dict], int], list[Rollout]],
                   score: Callable[[list[Rollout]], list[RewardResult]], times: dict[str, float]
                   ) -> tuple[list[Rollout], list[RewardResult], dict[str, float]]:
    """A step's groups, scored: G rollouts for each of `take(prompts_per_step)`'s prompts; then, with
    dynamic sampling, up to `max_refill_calls` more generate calls on the prompts `take` gives next,
    while fewer than prompts_per_step groups are informative (DAPO's re-sampling).

    take(n): the step's next n prompts (`StepPrompts.take`); generate(prompts, call): their rollouts,
    grouped (call 0 is the step's own prompts, 1.. the refills); score(rollouts): their results.
    A refill asks for the missing groups over the informative share so far (at most, and when none
    was informative, prompts_per_step prompts). With `domain_quotas` each domain short of its quota
    (`within_quotas`) is refilled on its own the same way, its quota in place of prompts_per_step, by
    `take(n, domain)`. Generating and scoring are timed as `generate` and `score`, refills included.
    """
    P, G = cfg.prompts_per_step, cfg.rollout.group_size
    rollouts: list[Rollout] = []
    results: list[RewardResult] = []
    prompts, calls, drawn = take(P), 0, 0
    while prompts:
        with timer("generate", times):
            new = generate(prompts, calls)
        with timer("score", times):
            results += score(new)
            for r in new:
                r.group += len(rollouts) // G  # numbered over the whole step
            rollouts += new
            informative = group_signal(rollouts, results, cfg)[2]
        if cfg.domain_quotas:
            wanted = _quota_refills(group_domains(rollouts, G), informative, P)
        else:
            wanted = {None: _refill_size(P, int(informative.sum()), float(informative.float().mean()))}
        if not cfg.dynamic_sampling or calls == cfg.max_refill_calls or not any(wanted.values()):
            break
        prompts = [s for domain, n in wanted.items() if n for s in take(n, domain)]
        calls += bool(prompts)
        drawn += len(prompts)
    return rollouts, results, {"refill/generate_calls": float(calls), "refill/groups_drawn": float(drawn)}


def _refill_size(quota: int, informative: int, share: float) -> int:
    """Prompts to draw for `quota - informative` missing groups when a `share` of groups is informative
    (at most `quota`; `quota` when none was); 0 when none is missing."""
    missing = quota - informative
    if missing <= 0:
        return 0
    return min(quota, math.ceil(missing / share)) if share else quota


def _quota_refills(domains: list[str], informative: torch.Tensor, P: int) -> dict[str, int]:
    """domain_quotas: prompts to draw for each domain, from its own quota and informative share so far."""
    out = {}
    for d, q in step_quotas(domains, P).items():
        mine = torch.tensor([x == d for x in domains])
        out[d] = _refill_size(q, int(informative[mine].sum()), float(informative[mine].float().mean()))
    return out


class StepPrompts:
    """One step's supply of prompts, in order: `take(n)` gives the next n not retired, `take(n, domain)`
    the next n of that domain (others it passes keep their place for later takes); `skipped` counts the
    retired ones passed over."""

    def __init__(self, candidates: Iterator[dict], retired: Callable[[dict], bool]):
        self.candidates, self.retired, self.skipped = candidates, retired, 0
        self.waiting: list[dict] = []  # passed over by a take for another domain

    def take(self, n: int, domain: str | None = None) -> list[dict]:
        out: list[dict] = []
        for s in [s for s in self.waiting if domain in (None, s["domain"])][:n]:
            self.waiting.remove(s)
            out.append(s)
        while len(out) < n and (s := next(self.candidates, None)) is not None:
            if self.retired(s):
                self.skipped += 1
            elif domain in (None, s["domain"]):
                out.append(s)
            else:
                self.waiting.append(s)
        return out


class PromptPlan:
    """Which prompts each step draws: a function of the seed, the step and the retirement history, so resumable.

    A step's supply (`supply(step)`), in order: its entries of the fixed plan over the train split
    (`batch_plan`, or `mixed_plan` with `mix`), then the rest of the split in an order of the step's own (what refills draw:
    never the step's own prompts). With `fresh_prompts`, new problems instead: chunks of
    prompts_per_step from the data's generators (`fresh_samples`; seeds from each source's seed, the
    step and the chunk; sources picked in proportion to `size`; never a held-out prompt), enough for
    every generate call of the step even when half are retired. `skip_uninformative_after: k` retires
    a prompt after k tied groups in a row; the history goes beside each checkpoint (`save`).
    """

    def __init__(self, cfg: Config, samples: list[dict], seed: int, history: dict[str, int] | None = None):
        self.cfg, self.samples, self.seed = cfg, samples, seed
        fresh = cfg.fresh_prompts
        if fresh:
            self.plan = []
        elif cfg.mix:
            self.plan = domain_plan(cfg.mix, samples, cfg.prompts_per_step, cfg.steps, seed)
        else:
            self.plan = batch_plan(len(samples), cfg.prompts_per_step, cfg.steps, seed)
        self.heldout = [{prompt_key(s) for s in load_samples(d, "heldout")} for d in cfg.data] if fresh else []
        self.streaks: dict[str, int] = dict(history or {})  # prompt hash -> tied groups in a row, up to now

    def supply(self, step: int) -> StepPrompts:
        return StepPrompts(self._candidates(step), self.retired)

    def retired(self, sample: dict) -> bool:
        k = self.cfg.skip_uninformative_after
        return k > 0 and self.streaks.get(_prompt_hash(sample), 0) >= k

    def record(self, rollouts: list[Rollout], results: list[RewardResult], supply: StepPrompts) -> dict[str, float]:
        """Note which prompts' groups were tied this step; metrics (none when retiring is off): `prompts/skipped`
        (retired prompts the step's supply passed over), `prompts/retired` (all retired so far)."""
        if not self.cfg.skip_uninformative_after:
            return {}
        _, counted, informative = group_signal(rollouts, results, self.cfg)
        enough = (counted.sum(-1) >= 2).tolist()
        for g, useful in enumerate(informative.tolist()):
            key = _prompt_hash(rollouts[g * self.cfg.rollout.group_size].sample)
            if useful:
                self.streaks.pop(key, None)
            elif enough[g]:  # a group of failed rewards says nothing about the prompt
                self.streaks[key] = self.streaks.get(key, 0) + 1
        k = self.cfg.skip_uninformative_after
        return {"prompts/skipped": float(supply.skipped), "prompts/retired": float(sum(n >= k for n in self.streaks.values()))}

    def save(self, checkpoint_dir: Path, step: int) -> None:
        """Write the history as of `step` beside checkpoint step_<step> (before it: the checkpoint publishes the
        step), and drop the files of checkpoints no longer kept."""
        if not self.cfg.skip_uninformative_after:
            return
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for f in checkpoint_dir.glob("prompt_history_step_*.json"):
            n = int(f.stem.rsplit("_", 1)[1])
            if n != step and not (checkpoint_dir / f"step_{n}").exists():
                f.unlink()
        atomic_write_text(_history_file(checkpoint_dir, step), json.dumps(self.streaks))

    @staticmethod
    def history(checkpoint: Path) -> dict[str, int] | None:
        """The history saved with `checkpoint` (.../step_N), or None."""
        f = _history_file(checkpoint.parent, checkpoint_step(checkpoint))
        return json.loads(f.read_text()) if f.exists() else None

    def _candidates(self, step: int) -> Iterator[dict]:
        if self.cfg.fresh_prompts:
            for chunk in range(2 * (1 + self.cfg.max_refill_calls)):
                yield from self._fresh(step, chunk)
            return
        own = self.plan[step]
        yield from (self.samples[i] for i in own)
        rng, seen = random.Random(f"{self.seed}:refill:{step}"), set(own)
        while len(seen) < len(self.samples):  # a lazy shuffle of the rest: a refill rarely needs much of it
            i = rng.randrange(len(self.samples))
            if i not in seen:
                seen.add(i)
                yield self.samples[i]

    def _fresh(self, step: int, chunk: int) -> list[dict]:
        data, P = self.cfg.data, self.cfg.prompts_per_step
        weights = [self.cfg.mix[d.domain] / sum(e.domain == d.domain for e in data) if self.cfg.mix else d.size
                   for d in data]
        picks = random.Random(f"{self.seed}:fresh:{step}:{chunk}").choices(range(len(data)), weights, k=P)
        made = {i: iter(fresh_samples(d, picks.count(i), _derived_seed(d.seed, step, chunk), self.heldout[i]))
                for i, d in enumerate(data) if i in picks}
        return [next(made[i]) for i in picks]


def _history_file(checkpoint_dir: Path, step: int) -> Path:
    return checkpoint_dir / f"prompt_history_step_{step}.json"


def _prompt_hash(sample: dict) -> str:
    return hashlib.sha1(prompt_key(sample).encode()).hexdigest()[:16]


def _derived_seed(seed: int, step: int, chunk: int) -> int:
    """A generator seed for (data seed, step, chunk), in [0, 2^32)."""
    return int(hashlib.sha256(f"{seed}:{step}:{chunk}".encode()).hexdigest()[:8], 16)


def pass_rate(spec: RewardSpec, results: list[RewardResult]) -> dict[str, float]:
    """Share of responses that fully pass the first-named (verifiable) reward: `pass_rate/<name>`."""
    name = next(iter(spec.weights))
    mine = [r for r in results if name in r.details]
    return {f"pass_rate/{name}": sum(r.details[name] >= 1.0 for r in mine) / max(1, len(mine))}


def probe_rows(tokenizer, samples: list[dict], cfg: Config) -> list[list[int]]:
    think = cfg.rollout.thinking()
    return [render_prompt(tokenizer, s["messages"], enable_thinking=think) for s in samples[: cfg.probe_prompts]]


def resources(cfg: Config) -> dict[str, float]:
    """Ray resources the stage holds at once at most: learner, rollout actors, reference group, reward actors."""
    parts = [cfg.learner.resources(), cfg.rollout.resources(), {"CPU": cfg.reward_workers * cfg.reward_cpus}]
    if cfg.kl_coef > 0 and not reference_is_base(cfg):
        parts.append(cfg.learner.resources(cpu_share=1 / 4))  # ReferencePolicy: same workers, a quarter of the CPUs
    return {k: sum(p.get(k, 0.0) for p in parts) for k in ("CPU", "GPU")}


def run(cfg: Config, ctx: StageContext) -> None:
    model_path = str(ctx.model_path(cfg.model))
    tok = load_tokenizer(model_path)
    samples = [s for d in cfg.data for s in load_samples(d, "train")]
    probe = probe_rows(tok, samples, cfg)
    resume = latest_checkpoint(ctx.checkpoint_dir)
    history = PromptPlan.history(resume) if resume else None
    if resume and cfg.skip_uninformative_after and history is None:
        log.warning("no prompt history beside %s: skip_uninformative_after starts counting afresh", resume.name)
    plan = PromptPlan(cfg, samples, ctx.seed, history)
    learner = GRPOLearner(model_path, cfg, str(resume) if resume else None, ctx.seed)
    workers: list = []
    ref = scorer = None
    try:
        workers = start_workers(model_path, cfg.rollout, cfg.agent, ctx.seed)
        if cfg.kl_coef > 0 and reference_is_base(cfg):
            ref = BaseWeightsReference(learner)
        elif cfg.kl_coef > 0:  # no reference actor at all when the KL term is off
            ref = ReferencePolicy(str(ctx.model_path(cfg.ref_model or cfg.model)), cfg)
        if cfg.reward_workers:
            from rewards.workers import RayRewardPool

            scorer = RayRewardPool(cfg.rewards, cfg.reward_workers, ctx.model_path, num_cpus=cfg.reward_cpus)
        else:
            scorer = CombinedReward(cfg.rewards, ctx.model_path)
        _train(cfg, ctx, learner, workers, ref, scorer, plan, probe, tok, resume)
    finally:  # a failed stage leaves no actors holding the cluster's CPUs
        stop_workers(workers)
        for group in (learner, ref):
            if group is not None:
                group.close()
        if hasattr(scorer, "close"):
            scorer.close()


def _train(cfg: Config, ctx: StageContext, learner: GRPOLearner, workers: list,
           ref: ReferencePolicy | BaseWeightsReference | None, scorer,
           plan: PromptPlan, probe: list[list[int]], tok, resume) -> None:
    """The loop of steps (generate, score, train, sync), then the final model."""
    ro = cfg.rollout
    start = learner.step
    if resume:
        truncate_metrics(ctx.out_dir, start)
        log.info("resuming %s from %s (step %d of %d)", ctx.name, resume.name, start, cfg.steps)
    sync_weights(learner.group, workers, probe, ro.sync_bucket_mb)  # rollout workers get the (resumed) learner weights
    log.info("grpo %s: %s, %d steps of %d prompts x G=%d", ctx.name,
             "fresh prompts" if cfg.fresh_prompts else f"{len(plan.samples)} prompts", cfg.steps, cfg.prompts_per_step,
             ro.group_size)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=ctx.name, mininterval=2.0)
    for step in bar:
        times: dict[str, float] = {}
        supply = plan.supply(step)
        rollouts, results, m = rollout_groups(
            cfg, supply.take,
            lambda prompts, call: generate_on(workers, prompts, step + call * cfg.steps),  # each call its own seed
            lambda rs: scorer([r.reward_sample() for r in rs]), times)
        with timer("score", times):
            keep, adv, more = score_and_advantages(rollouts, results, cfg)
            m.update(more)
            m.update(scorer.metrics(results) if hasattr(scorer, "metrics") else {})
            m.update(pass_rate(cfg.rewards, results))
            m.update(plan.record(rollouts, results, supply))
        with timer("train", times):
            batch = collate_rollouts([rollouts[i] for i in keep], adv, tok.pad_token_id) if keep else None
            ref_logp = ref.logprobs(batch) if ref is not None and batch is not None else None
            m.update(learner.train_step(batch, ref_logp))
        with timer("sync", times):
            m.update(sync_weights(learner.group, workers, probe, ro.sync_bucket_mb))
        if any(r.episode for r in rollouts):
            m["agent/turns_mean"] = sum(r.turns for r in rollouts) / len(rollouts)
        m.update(service_metrics())  # the nodes' sandbox services, when the workflow runs them
        ctx.log_metrics(step + 1, {**m, **times})
        bar.set_postfix(reward=f"{m['reward/mean']:.3f}", kl=f"{m.get('kl', 0):.3f}", len=f"{m['response/length_mean']:.0f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            plan.save(ctx.checkpoint_dir, step + 1)
            learner.save(str(ctx.checkpoint_dir))
    learner.save_final(str(ctx.out_dir / MODEL_DIR))
