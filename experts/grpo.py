"""Stage `grpo`: push one domain expert to its peak with GRPO against its domain's rewards.

Set-up (samples, prompt plan, actors), one loop of steps, save. Each step:

    generate  rollout actors sample G responses per prompt (agent prompts: sandbox episodes)
    score     reward actors score them (`rewards.RewardSpec`); overlong shaping; group advantages
    train     the learner recomputes old log-probs, then epochs x mini-batches of clipped updates
    sync      new weights go to the rollout actors, and a probe batch proves they arrived

Ray actors are thin shells over plain classes: `RolloutWorker` (experts.rollout), `GRPOLearner`
and `ReferencePolicy` (here; the reference is skipped when `kl_coef` is 0), `RayRewardPool`
(rewards.workers). The math lives in `experts.grpo_loss`; docs/grpo.md lists every choice.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import ray
import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from experts.agent_rollout import AgentConfig
from experts.data import DataConfig, load_samples
from experts.generate import render_prompt
from experts.grpo_loss import (
    LossAgg,
    entropy_from_logits,
    group_advantages,
    informative_groups,
    overlong_penalty,
    policy_loss,
    token_logprobs,
)
from experts.models import load_model, load_tokenizer, save_checkpoint
from experts.rollout import Rollout, RolloutConfig, RolloutWorker
from experts.sft import batch_plan
from experts.train import (
    check_finite,
    latest_checkpoint,
    load_train_state,
    make_optimizer,
    pick_device,
    save_train_state,
    set_threads,
    truncate_metrics,
)
from pipeline.config import MAX_BATCH, MAX_TOKENS, BatchSize, LearningRate, ModelRef, StageConfig, Steps
from pipeline.context import MODEL_DIR, StageContext, timer
from rewards import CombinedReward, RewardResult, RewardSpec

log = logging.getLogger(__name__)


class Config(StageConfig):
    model: ModelRef = Field(description="Starting checkpoint (usually the domain's SFT stage).")
    ref_model: ModelRef | None = Field(None, description="Reference policy for the KL term; None: `model`.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompts (train split) of the expert's domain.")
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
    threads: int = Field(0, ge=0, le=4096, description="CPU threads for the learner and reference (0: all cores).")
    num_cpus: float = Field(1, gt=0, le=4096, description="CPUs the learner actor reserves in Ray.")
    num_gpus: float = Field(0, ge=0, le=1024, description="GPUs the learner actor reserves in Ray.")
    reward_workers: int = Field(1, ge=0, le=1024, description="Reward actors; 0 scores in the driver process.")
    reward_cpus: float = Field(0.25, gt=0, le=4096, description="CPUs each reward actor reserves.")
    probe_prompts: int = Field(4, ge=1, le=1024, description="Prompts in the probe batch that checks each weight sync.")

    @model_validator(mode="after")
    def _rollout_fits(self):
        """The rollout's own config (experts.rollout) is bounded here, where its sizes multiply."""
        ro = self.rollout
        for field, value, most in (
            ("prompts_per_step x rollout.group_size", self.prompts_per_step * ro.group_size, MAX_BATCH),
            ("rollout.max_new_tokens", ro.max_new_tokens, MAX_TOKENS),
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


@torch.no_grad()
def sequence_logprobs(model, batch: dict[str, torch.Tensor], temperature: float, micro: int) -> torch.Tensor:
    """log pi of every next token, [B, L-1], computed in micro-batches without gradients."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, batch["input_ids"].shape[0], micro):
        ids = batch["input_ids"][i : i + micro].to(device)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"][i : i + micro].to(device)).logits
        out.append(token_logprobs(logits[:, :-1], ids[:, 1:], temperature).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


class ReferencePolicy:
    """The frozen reference policy: only log-probs, for the KL term."""

    def __init__(self, model_path: str, cfg: Config):
        set_threads(cfg.threads)
        self.cfg, self.model = cfg, load_model(model_path).to(pick_device()).eval()

    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logprobs(self.model, batch, self.cfg.rollout.temperature, self.cfg.micro_batch_size)


class GRPOLearner:
    """Holds the policy and optimizer; one `train_step` is one GRPO step's updates on one rollout batch."""

    def __init__(self, model_path: str, cfg: Config, resume_from: str | None = None, seed: int = 0):
        set_threads(cfg.threads)
        self.cfg, self.device, self.seed = cfg, pick_device(), seed
        self.tokenizer = load_tokenizer(resume_from or model_path)
        self.model = load_model(resume_from or model_path).to(self.device)
        total = cfg.steps * cfg.epochs * cfg.mini_batches
        self.opt, self.sched = make_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.warmup_steps, total, cfg.min_lr_ratio)
        self.step = load_train_state(resume_from, self.opt, self.sched) if resume_from else 0

    def get_step(self) -> int:
        return self.step

    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logprobs(self.model, batch, self.cfg.rollout.temperature, self.cfg.micro_batch_size)

    def prompt_logprobs(self, rows: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of each row's tokens 1..n (the weight-sync probe)."""
        return [self.logprobs({"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)})[0].tolist()
                for r in rows]

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def train_step(self, batch: dict[str, torch.Tensor] | None, ref_logp: torch.Tensor | None = None) -> dict[str, float]:
        """Recompute old log-probs, then `epochs` x `mini_batches` clipped updates; None: no update this step."""
        cfg = self.cfg
        self.step += 1
        if batch is None or batch["input_ids"].shape[0] == 0:
            return {"lr": self.sched.get_last_lr()[0], "updates": 0}
        old = self.logprobs(batch)  # pi_old by the learner's own math, not the rollout engine's
        mask = batch["loss_mask"]
        n_tok = mask.sum().clamp(min=1)
        gap = ((old - batch["rollout_logp"]).abs() * mask).sum() / n_tok
        self.model.train()
        B = batch["input_ids"].shape[0]
        g = torch.Generator().manual_seed(self.seed * 7919 + self.step)
        sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0}
        updates = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(B, generator=g)
            size = math.ceil(B / cfg.mini_batches)
            for mb in order.split(size):
                m_mb = mask[mb]
                norm = float(m_mb.sum().clamp(min=1)) if cfg.loss_agg == "token_mean" else float(len(mb))
                for micro in mb.split(cfg.micro_batch_size):
                    ids = batch["input_ids"][micro].to(self.device)
                    logits = self.model(input_ids=ids, attention_mask=batch["attention_mask"][micro].to(self.device)).logits[:, :-1]
                    logp = token_logprobs(logits, ids[:, 1:], cfg.rollout.temperature)
                    m = mask[micro].to(self.device)
                    loss, st = policy_loss(
                        logp, old[micro].to(self.device), batch["advantages"][micro].to(self.device), m,
                        cfg.clip_low, cfg.clip_high, cfg.loss_agg,
                        ref_logp=None if ref_logp is None else ref_logp[micro].to(self.device),
                        kl_coef=cfg.kl_coef, normaliser=norm,
                    )
                    check_finite(f"step {self.step}", loss=loss)
                    loss.backward()
                    w = float(m.sum()) / float(m_mb.sum().clamp(min=1))  # token share of this micro-batch
                    with torch.no_grad():
                        ent = (entropy_from_logits(logits.detach(), cfg.rollout.temperature) * m).sum() / m.sum().clamp(min=1)
                    sums["loss"] += loss.item()
                    for k, v in (("clip_frac", st["clip_frac"]), ("kl", st["kl"]), ("entropy", ent)):
                        sums[k] += w * float(v)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
                check_finite(f"step {self.step}", grad_norm=grad_norm)
                sums["grad_norm"] += grad_norm
                lr = self.sched.get_last_lr()[0]
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                updates += 1
        out = {k: v / updates for k, v in sums.items()}
        return {**out, "lr": lr, "updates": updates, "logp_gap/rollout_vs_learner": float(gap), "tokens": float(n_tok)}

    def save(self, checkpoint_dir: str) -> str:
        return str(save_train_state(Path(checkpoint_dir), self.model, self.tokenizer, self.opt, self.sched,
                                    self.step, self.cfg.keep_checkpoints))

    def save_final(self, path: str) -> str:
        return str(save_checkpoint(self.model, self.tokenizer, path))


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
    return {f"pass_rate/{name}": sum(r.details.get(name, 0.0) >= 1.0 for r in results) / max(1, len(results))}


def probe_rows(tokenizer, samples: list[dict], cfg: Config) -> list[list[int]]:
    think = cfg.rollout.reasoning != "non_think"
    return [render_prompt(tokenizer, s["messages"], enable_thinking=think) for s in samples[: cfg.probe_prompts]]


def sync_gap(learner_lp: list[list[float]], rollout_lp: list[list[float]]) -> float:
    """Mean |difference| of two engines' log-probs for the same probe tokens."""
    a = torch.tensor([x for row in learner_lp for x in row])
    b = torch.tensor([x for row in rollout_lp for x in row])
    return float((a - b).abs().mean())


def sync_weights(learner, workers: list, probe: list[list[int]], tol: float) -> float:
    """Push the learner's weights to every rollout worker and prove they arrived (raises if stale)."""
    weights = learner.get_weights.remote()
    ray.get([w.load_weights.remote(weights) for w in workers])
    want = ray.get(learner.prompt_logprobs.remote(probe))
    gaps = [sync_gap(want, got) for got in ray.get([w.prompt_logprobs.remote(probe) for w in workers])]
    if max(gaps) > tol:
        raise RuntimeError(f"rollout weights are stale: probe log-probs differ from the learner's by {max(gaps):.3g} "
                           f"(tolerance {tol:g}); the weight sync did not take")
    return max(gaps)


def run(cfg: Config, ctx: StageContext) -> None:
    model_path = str(ctx.model_path(cfg.model))
    tok = load_tokenizer(model_path)
    samples = load_samples(cfg.data, "train")
    plan = batch_plan(len(samples), cfg.prompts_per_step, cfg.steps, ctx.seed)
    probe = probe_rows(tok, samples, cfg)
    resume = latest_checkpoint(ctx.checkpoint_dir)
    start_from = str(resume) if resume else model_path
    learner = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(GRPOLearner).remote(
        model_path, cfg, str(resume) if resume else None, ctx.seed)
    ro = cfg.rollout
    workers = [ray.remote(num_cpus=ro.num_cpus, num_gpus=ro.num_gpus)(RolloutWorker).remote(start_from, ro, cfg.agent, ctx.seed + i)
               for i in range(ro.num_workers)]
    ref = None
    if cfg.kl_coef > 0:  # no reference actor at all when the KL term is off
        ref = ray.remote(num_cpus=0.25)(ReferencePolicy).remote(str(ctx.model_path(cfg.ref_model or cfg.model)), cfg)
    if cfg.reward_workers:
        from rewards.workers import RayRewardPool

        scorer = RayRewardPool(cfg.rewards, cfg.reward_workers, ctx.model_path, num_cpus=cfg.reward_cpus)
    else:
        scorer = CombinedReward(cfg.rewards, ctx.model_path)
    start = ray.get(learner.get_step.remote())
    if resume:
        truncate_metrics(ctx.out_dir, start)
        log.info("resuming %s from %s (step %d of %d)", ctx.name, resume.name, start, cfg.steps)
    sync_weights(learner, workers, probe, ro.tolerance())  # rollout and learner start from the same weights
    log.info("grpo %s: %d prompts, %d steps of %d prompts x G=%d", ctx.name, len(samples), cfg.steps,
             cfg.prompts_per_step, ro.group_size)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=ctx.name, mininterval=2.0)
    for step in bar:
        times: dict[str, float] = {}
        batch_samples = [samples[i] for i in plan[step]]
        with timer("generate", times):
            shards = [batch_samples[i :: len(workers)] for i in range(len(workers))]
            firsts = [sum(len(s) for s in shards[:i]) for i in range(len(workers))]
            parts = ray.get([w.generate.remote(s, f, step) for w, s, f in zip(workers, shards, firsts) if s])
            rollouts = [r for part in parts for r in part]
        with timer("score", times):
            results = scorer([r.reward_sample() for r in rollouts])
            keep, adv, m = score_and_advantages(rollouts, results, cfg)
            m.update(scorer.metrics(results) if hasattr(scorer, "metrics") else {})
            m.update(pass_rate(cfg.rewards, results))
        with timer("train", times):
            batch = collate_rollouts([rollouts[i] for i in keep], adv, tok.pad_token_id) if keep else None
            ref_logp = ray.get(ref.logprobs.remote(batch)) if ref is not None and batch is not None else None
            m.update(ray.get(learner.train_step.remote(batch, ref_logp)))
        with timer("sync", times):
            m["sync/probe_logp_gap"] = sync_weights(learner, workers, probe, ro.tolerance())
        if any(r.episode for r in rollouts):
            m["agent/turns_mean"] = sum(r.turns for r in rollouts) / len(rollouts)
        ctx.log_metrics(step + 1, {**m, **times})
        bar.set_postfix(reward=f"{m['reward/mean']:.3f}", kl=f"{m.get('kl', 0):.3f}", len=f"{m['response/length_mean']:.0f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            ray.get(learner.save.remote(str(ctx.checkpoint_dir)))

    ray.get(learner.save_final.remote(str(ctx.out_dir / MODEL_DIR)))
    ray.get([w.close.remote() for w in workers])
    for actor in [learner, *workers, *([ref] if ref is not None else [])]:
        ray.kill(actor)
    if hasattr(scorer, "close"):
        scorer.close()
