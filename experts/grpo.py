"""Stage `grpo`: push one domain expert to its peak with GRPO against its domain's rewards.

Set-up (samples, prompt plan, actors), one loop of steps, save. Each step:

    generate  rollout actors sample G responses per prompt (agent prompts: sandbox episodes)
    score     reward actors score them (`rewards.RewardSpec`); overlong shaping; group advantages
    train     epochs x mini-batches of clipped updates, each token weighted by truncated IS when the
              rollout engine differs from the learner (old log-probs get their own forward pass
              only when there is more than one update per batch: with one, they are the update's own)
    sync      new weights stream to the rollout actors layer by layer; a probe batch proves they arrived

Ray actors are thin shells over plain classes: `RolloutWorker` (rollout.worker), `GRPOLearner`
and `ReferencePolicy` (here; the reference is skipped when `kl_coef` is 0), `RayRewardPool`
(rewards.workers). The math lives in `experts.grpo_loss`; docs/grpo.md lists every choice.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from experts.data import DataConfig, load_samples
from experts.grpo_loss import (
    LossAgg,
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
from learner.optim import Optim
from pipeline.config import MAX_BATCH, MAX_TOKENS, BatchSize, LearningRate, ModelRef, StageConfig, Steps
from pipeline.context import MODEL_DIR, StageContext, timer
from rewards import CombinedReward, RewardResult, RewardSpec
from rollout.config import AgentConfig, RolloutConfig
from rollout.sync import sync_weights
from rollout.turns import render_prompt
from rollout.types import Rollout
from rollout.worker import generate_on, start_workers, stop_workers
from sandbox.service import service_metrics

log = logging.getLogger(__name__)


class Config(StageConfig):
    model: ModelRef = Field(description="Starting checkpoint (usually the domain's SFT stage).")
    ref_model: ModelRef | None = Field(None, description="Reference policy for the KL term; None: `model`.")
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
    kl_coef: float = Field(0.0, ge=0, le=1000, description="Weight of the k3 KL to the reference; 0 (DAPO, Dr. GRPO) skips the reference actor.")
    loss_agg: LossAgg = Field("token_mean", description="token_mean (DAPO): every response token weighs the same; seq_mean: mean per response, then over responses (GRPO).")
    scale_adv_by_std: bool = Field(True, description="Divide group-centred rewards by the group std (GRPO); False is Dr. GRPO.")
    dynamic_sampling: bool = Field(True, description="Drop groups whose G rewards are all equal (no signal); DAPO.")
    overlong: Literal["none", "penalty", "filter"] = Field(
        "filter", description="Responses cut by max_new_tokens: filter masks them out of the loss; penalty adds DAPO's soft length penalty.")
    overlong_buffer: int = Field(16, ge=1, le=MAX_TOKENS, description="penalty: the last N tokens before max_new_tokens ramp the penalty from 0 to overlong_penalty.")
    overlong_penalty: float = Field(1.0, ge=0, le=1000, description="penalty: reward lost by a response of max_new_tokens tokens.")
    save_every: Steps = Field(50, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Newest checkpoints kept on disk.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Workers, sharding and dtype of the "
                                   "policy's trainer (and of the reference, when kl_coef > 0); micro_batch_size "
                                   "is per worker.")
    reward_workers: int = Field(1, ge=0, le=1024, description="Reward actors; 0 scores in the driver process.")
    reward_cpus: float = Field(0.25, gt=0, le=4096, description="CPUs each reward actor reserves.")
    probe_prompts: int = Field(4, ge=1, le=1024, description="Prompts in the probe batch that checks each weight sync.")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, (dict, DataConfig)) else v

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
              loss_agg: LossAgg, kl_coef: float, tis_cap: float | None) -> tuple[torch.Tensor, dict[str, float]]:
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
                           ref_logp=cut.get("ref_logp"), kl_coef=kl_coef, normaliser=1.0, is_weights=w)
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
        ref = cfg.learner.model_copy(update={"cpus_per_worker": cfg.learner.cpus_per_worker / 4})
        self.group = WorkerGroup(model_path, ref, None, name="grpo reference", local=local)

    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logprobs(self.group, batch, self.cfg)

    def close(self) -> None:
        self.group.close()


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
                                      tis_cap=cfg.rollout.cap())
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


def score_and_advantages(rollouts: list[Rollout], results: list[RewardResult], cfg: Config) -> tuple[list[int], list[float], dict]:
    """Turn rewards into per-rollout advantages; returns (kept rollout indices, their advantages, metrics).

    Rollouts arrive grouped (G consecutive per prompt). Overlong shaping applies first, then group
    advantages; with dynamic sampling, groups whose rewards are all equal are dropped.
    """
    G = cfg.rollout.group_size
    rewards = torch.tensor([r.score for r in results], dtype=torch.float)
    lengths = torch.tensor([sum(r.loss_mask) for r in rollouts])
    truncated = torch.tensor([not r.finished for r in rollouts])
    if cfg.overlong == "penalty":
        rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
    groups = rewards.view(-1, G)
    adv = group_advantages(groups, cfg.scale_adv_by_std).flatten()
    keep_group = informative_groups(groups) if cfg.dynamic_sampling else torch.ones(groups.shape[0], dtype=torch.bool)
    keep = keep_group.repeat_interleave(G)
    if cfg.overlong == "filter":
        keep &= ~truncated
    idx = keep.nonzero().flatten().tolist()
    metrics = {
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "groups/zero_variance_dropped": float((~keep_group).sum()), "groups/total": float(groups.shape[0]),
        "response/length_mean": float(lengths.float().mean()), "response/length_max": float(lengths.max()),
        "response/truncated_frac": float(truncated.float().mean()), "rollouts/trained": float(len(idx)),
    }
    return idx, [float(adv[i]) for i in idx], metrics


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
    if cfg.kl_coef > 0:
        parts.append(cfg.learner.resources(cpu_share=1 / 4))  # ReferencePolicy: same workers, a quarter of the CPUs
    return {k: sum(p.get(k, 0.0) for p in parts) for k in ("CPU", "GPU")}


def run(cfg: Config, ctx: StageContext) -> None:
    model_path = str(ctx.model_path(cfg.model))
    tok = load_tokenizer(model_path)
    samples = [s for d in cfg.data for s in load_samples(d, "train")]
    plan = batch_plan(len(samples), cfg.prompts_per_step, cfg.steps, ctx.seed)
    probe = probe_rows(tok, samples, cfg)
    resume = latest_checkpoint(ctx.checkpoint_dir)
    learner = GRPOLearner(model_path, cfg, str(resume) if resume else None, ctx.seed)
    workers: list = []
    ref = scorer = None
    try:
        workers = start_workers(model_path, cfg.rollout, cfg.agent, ctx.seed)
        if cfg.kl_coef > 0:  # no reference actor at all when the KL term is off
            ref = ReferencePolicy(str(ctx.model_path(cfg.ref_model or cfg.model)), cfg)
        if cfg.reward_workers:
            from rewards.workers import RayRewardPool

            scorer = RayRewardPool(cfg.rewards, cfg.reward_workers, ctx.model_path, num_cpus=cfg.reward_cpus)
        else:
            scorer = CombinedReward(cfg.rewards, ctx.model_path)
        _train(cfg, ctx, learner, workers, ref, scorer, samples, plan, probe, tok, resume)
    finally:  # a failed stage leaves no actors holding the cluster's CPUs
        stop_workers(workers)
        for group in (learner, ref):
            if group is not None:
                group.close()
        if hasattr(scorer, "close"):
            scorer.close()


def _train(cfg: Config, ctx: StageContext, learner: GRPOLearner, workers: list, ref: ReferencePolicy | None, scorer,
           samples: list[dict], plan: list[list[int]], probe: list[list[int]], tok, resume) -> None:
    """The loop of steps (generate, score, train, sync), then the final model."""
    ro = cfg.rollout
    start = learner.step
    if resume:
        truncate_metrics(ctx.out_dir, start)
        log.info("resuming %s from %s (step %d of %d)", ctx.name, resume.name, start, cfg.steps)
    sync_weights(learner.group, workers, probe, ro.sync_bucket_mb)  # rollout workers get the (resumed) learner weights
    log.info("grpo %s: %d prompts, %d steps of %d prompts x G=%d", ctx.name, len(samples), cfg.steps,
             cfg.prompts_per_step, ro.group_size)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=ctx.name, mininterval=2.0)
    for step in bar:
        times: dict[str, float] = {}
        batch_samples = [samples[i] for i in plan[step]]
        with timer("generate", times):
            rollouts = generate_on(workers, batch_samples, step)
        with timer("score", times):
            results = scorer([r.reward_sample() for r in rollouts])
            keep, adv, m = score_and_advantages(rollouts, results, cfg)
            m.update(scorer.metrics(results) if hasattr(scorer, "metrics") else {})
            m.update(pass_rate(cfg.rewards, results))
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
            learner.save(str(ctx.checkpoint_dir))
    learner.save_final(str(ctx.out_dir / MODEL_DIR))
