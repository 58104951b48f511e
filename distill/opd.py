"""Stage `opd`: merge domain experts into one student by on-policy distillation (DeepSeek-V4 recipe).

Each round: the student's weights go to the rollout workers (sync), which sample responses to
prompts from every domain on HF or vLLM, the same rollout as GRPO's, agent prompts as whole sandbox
episodes (generate); on every learner rank, each teacher in turn encodes that rank's share of the
samples of its domains and its last-layer states at the tokens the student sampled go to the rank's
own cache (teacher_forward); each rank then streams its own cache teacher by teacher and the group
minimises the divergence to the teacher of each sample's domain, each domain of a step weighing the
same (`balance`), with one teacher LM head in memory per rank at a time (train). A teacher may be an
fsspec URL (`s3://bucket/expert`): it is copied to `<out_dir>/teachers/` for each round and deleted
after it.

    opd:
      kind: opd
      needs: [base, sft_math, sft_code]
      config:
        student: base
        teachers:
          - {model: sft_math, domains: [math]}
          - {model: sft_code, domains: [code]}
        data:
          - {domain: math, source: jsonl, path: data/math.jsonl}
          - {domain: code, source: jsonl, path: data/code.jsonl}
        rounds: 4
        rollout: {backend: vllm, max_new_tokens: 128}
"""

from __future__ import annotations

import functools
import logging
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm import tqdm

from distill.cache import step_batches, step_samples, step_tokens
from distill.student import RankStep, opd_objective, rank_weights, student_loader
from distill.teacher import fetch_model, is_url, rank_prune, rank_root, rank_teacher_forward, split_groups
from experts.data import DataConfig, load_samples
from experts.models import load_tokenizer
from learner.checkpoint import checkpoint_step, latest_checkpoint, truncate_metrics
from learner.config import LearnerConfig, whole_model
from learner.group import WorkerGroup
from learner.optim import Optim
from pipeline.config import (MAX_BATCH, MAX_TOKENS, BatchSize, LearningRate, ModelRef, StageConfig, Steps,
                             StorageModelRef, Tokens, UserError)
from pipeline.context import MODEL_DIR, StageContext, timer
from rollout.config import AgentConfig, RolloutConfig
from rollout.sync import sync_weights
from rollout.turns import render_prompt
from rollout.types import Rollout
from rollout.worker import generate_on, start_workers, stop_workers

log = logging.getLogger(__name__)


class TeacherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: StorageModelRef = Field(description="The expert checkpoint: a stage name, an HF checkpoint directory, or an "
                                        "fsspec URL of one (s3://, gs://, hdfs://, file://...), copied under "
                                        "<out_dir>/teachers for each round and deleted after it.")
    domains: list[str] = Field(min_length=1, description="Domains whose prompts this teacher answers for.")
    name: str | None = Field(None, description="Name in metrics and logs; defaults to `model`.")


class StudentRollout(RolloutConfig):
    """The rollout, with defaults for distillation: one sample per prompt, free thinking."""

    group_size: int = Field(1, ge=1, description="Samples per prompt.")
    reasoning: Literal["non_think", "think", "think_high", "think_max"] = Field(
        "think", description="non_think | think (freely, within max_new_tokens) | think_high | think_max (rollout.config).")
    batch_size: int = Field(32, ge=1, description="Sequences per generate call (hf backend).")


class Config(StageConfig):
    student: ModelRef = Field(description="Checkpoint the student starts from; must share the teachers' tokenizer.")
    teachers: list[TeacherConfig] = Field(min_length=1, description="Experts, each with the domains it answers for.")
    data: list[DataConfig] = Field(min_length=1, description="Prompt sources; a sample's domain picks its teacher.")
    rounds: Steps = Field(4, description="Rounds of generate -> teacher forward -> train (at most 1,000,000).")
    prompts_per_round: BatchSize = Field(64, description="Prompts sampled per round, split evenly over domains (at most 65,536).")
    rollout: StudentRollout = Field(
        default_factory=StudentRollout,
        description="How the student samples (the rollout GRPO uses): engine, workers, max_new_tokens, "
                    "temperature (on-policy: keep 1); group_size responses per prompt.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="Agent-domain prompts run as whole sandbox "
                               "episodes (turn and token limits); only the tokens the student wrote are distilled.")
    teacher_batch_size: BatchSize = Field(16, description="Sequences per teacher forward pass.")
    steps_per_round: int = Field(1, ge=1, le=MAX_BATCH, description="Optimizer steps per round, each over a mix of all domains; "
                                                   "1 is strictly on-policy. Heads load once per teacher per step.")
    batch_tokens: Tokens = Field(2048, description="Tokens (prompt + response) per micro-batch; gradients of a "
                                                  "step's micro-batches are accumulated.")
    lr: LearningRate = Field(1e-4, description="AdamW learning rate of the student, in (0, 1].")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay (at most 10).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = Field(
        "reverse_kl", description="Per-token loss: KL(student||teacher), KL(teacher||student) or GKD's JSD(beta).")
    balance: Literal["domain", "sequence", "token"] = Field(
        "domain", description="How a step's tokens weigh in its loss. domain: each domain present weighs the same "
                              "(the mean over domains of each domain's token mean); sequence: each response; "
                              "token: each token (long-answer domains dominate).")
    beta: float = Field(0.5, gt=0, lt=1, description="JSD interpolation (divergence: jsd).")
    loss_temperature: float = Field(1.0, gt=0, description="Softmax temperature of both models in the loss.")
    chunk_size: Tokens = Field(512, description="Tokens per logits chunk in the loss (peak memory ~ chunk x vocab).")
    cache_url: str | None = Field(None, description="Where the teacher cache goes: a local dir or fsspec URL; "
                                                    "default <out_dir>/cache.")
    cache_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Dtype of cached states.")
    shard_tokens: Tokens = Field(65536, description="Response tokens per cache shard (at most, roughly).")
    keep_rounds: int = Field(1, ge=0, le=1000, description="Finished rounds' caches to keep; 0 deletes each after training.")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Newest round checkpoints kept on disk.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Workers, sharding and dtype of the "
                                   "student's trainer; each worker also runs the teachers on its share of the "
                                   "samples (one teacher at a time, on its device) and trains on what it cached.")

    _whole_model = field_validator("learner")(whole_model)

    @model_validator(mode="after")
    def _one_teacher_per_domain(self):
        ro = self.rollout
        if ro.longest() > MAX_TOKENS or self.prompts_per_round * ro.group_size > MAX_BATCH:
            raise ValueError(f"rollout.max_new_tokens (and each rollout.domains one) is at most {MAX_TOKENS} and "
                             f"prompts_per_round x rollout.group_size at most {MAX_BATCH}")
        for field, value, most in (("agent.max_total_tokens", self.agent.max_total_tokens, MAX_TOKENS),
                                   ("agent.max_turns", self.agent.max_turns, 1024),
                                   ("agent.sandboxes", self.agent.sandboxes, 1024)):
            if value > most:
                raise ValueError(f"{field} is {value}; at most {most}")
        if is_url(self.student):
            raise ValueError(f"student: {self.student!r}: fsspec URLs are for teachers; the student is a stage "
                             "name or a local checkpoint directory")
        owner: dict[str, int] = {}
        for i, t in enumerate(self.teachers):
            for d in t.domains:
                if d in owner:
                    raise ValueError(f"domain {d!r} is claimed by teachers {owner[d]} and {i}")
                owner[d] = i
        return self


def resources(cfg: Config) -> dict[str, float]:
    """Ray resources the stage holds at once at most: the student's learner group and its rollout actors."""
    a, b = cfg.learner.resources(), cfg.rollout.resources()
    return {k: a[k] + b[k] for k in a}


def run(cfg: Config, ctx: StageContext, local: bool = False) -> None:
    """Distil the teachers into the student for `cfg.rounds` rounds; resume from the last round checkpoint.

    The student trains as a learner group and samples on rollout workers (`local=True`: one rank
    and one rollout worker in this process, for tests); the teachers run on the learner ranks, one
    at a time, each rank on its share of the samples.
    """
    # ---- set-up: resolve models (of teachers in storage only the small files), check tokenizers, route, resume
    remote = {i: t.model for i, t in enumerate(cfg.teachers) if is_url(t.model)}
    teacher_paths = [ctx.out_dir / "teachers" / f"{i:03d}" if i in remote else ctx.model_path(t.model)
                     for i, t in enumerate(cfg.teachers)]
    names = [t.name or t.model for t in cfg.teachers]
    route = {d: i for i, t in enumerate(cfg.teachers) for d in t.domains}
    student_path = ctx.model_path(cfg.student)
    tokenizer = load_tokenizer(student_path)
    try:
        _fetch_teachers(remote, teacher_paths, weights=False)
        _check_same_tokenizer(tokenizer, student_path, teacher_paths)
    finally:
        _drop_teachers(remote, teacher_paths)
    by_domain = _prompts_by_domain(cfg.data, route)
    domains = list(by_domain)
    cache_root = cfg.cache_url or str(ctx.out_dir / "cache")
    probe = [render_prompt(tokenizer, s[0]["messages"], cfg.rollout.thinking()) for s in list(by_domain.values())[:4]]

    resume = latest_checkpoint(ctx.checkpoint_dir)
    start = checkpoint_step(resume) + 1 if resume else 1  # checkpoints are named by round
    optim = Optim(lr=cfg.lr, total_steps=cfg.rounds * cfg.steps_per_round, weight_decay=cfg.weight_decay,
                  max_grad_norm=cfg.max_grad_norm, betas=(0.9, 0.999))  # constant LR, AdamW's defaults
    loader = functools.partial(student_loader, teacher_paths=[str(p) for p in teacher_paths])
    group = WorkerGroup(str(student_path), cfg.learner, optim, loader=loader, resume=str(resume) if resume else None,
                        name=ctx.name, local=local)
    objective = functools.partial(opd_objective, divergence=cfg.divergence, temperature=cfg.loss_temperature,
                                  beta=cfg.beta, chunk_size=cfg.chunk_size, domains=domains, teachers=names)
    workers: list = []
    try:
        workers = start_workers(str(student_path), cfg.rollout, cfg.agent, seed=ctx.seed, local=local)
        if resume:
            truncate_metrics(ctx.out_dir, start - 1)
            log.info("opd: resuming after round %d from %s", start - 1, resume)
        log.info("opd: %d teachers (%d in storage), %d domains, rounds %d..%d, cache %s", len(names), len(remote),
                 len(by_domain), start, cfg.rounds, cache_root)
        bar = tqdm(range(start, cfg.rounds + 1), initial=start - 1, total=cfg.rounds, desc=ctx.name, unit="round",
                   mininterval=2.0)
        for r in bar:
            loss = _round(r, cfg, ctx, group, workers, objective, tokenizer, by_domain, route, names, teacher_paths,
                          remote, cache_root, probe)
            bar.set_postfix(loss=f"{loss:.4f}")
        group.save_hf(ctx.out_dir / MODEL_DIR, str(student_path))
    finally:
        stop_workers(workers)
        group.close()


def _round(r, cfg, ctx, group, workers, objective, tokenizer, by_domain, route, names, teacher_paths, remote,
           cache_root, probe) -> float:
    """One round: sync and sample, teacher forward into each rank's cache, train on it, checkpoint; its mean loss."""
    domains = list(by_domain)
    times: dict[str, float] = {}
    policy = f"{ctx.name} after round {r - 1}"  # the cache of this round is valid only for this student
    samples = _round_prompts(by_domain, r, cfg.prompts_per_round)

    with timer("sync", times):
        synced = sync_weights(group, workers, probe, cfg.rollout.sync_bucket_mb)
    with timer("generate", times):  # agent prompts: whole episodes; a rollout with nothing sampled has nothing to learn
        rollouts = [ro for ro in generate_on(workers, samples, step=r, episodes=True) if any(ro.loss_mask)]

    # (teacher, step) -> rollouts; each domain's rollouts are dealt over the steps in turn, so every step
    # holds an even share of every domain (a domain-balanced step then never rests on one lone sample)
    groups: dict[tuple[int, int], list[Rollout]] = defaultdict(list)
    for i, ro in enumerate(sorted(rollouts, key=lambda ro: ro.domain)):
        groups[(route[ro.domain], i % cfg.steps_per_round)].append(ro)
    try:
        with timer("fetch_teachers", times):  # teachers in storage, this round's only: dropped after it
            _fetch_teachers({t: u for t, u in remote.items() if any(t == g for g, _ in groups)}, teacher_paths)
        with timer("teacher_forward", times):  # every rank: its share, teacher after teacher, into its own cache
            teachers = [{"name": n, "path": str(remote.get(i, p)), "domains": list(t.domains)}  # the cache checks
                        for i, (n, p, t) in enumerate(zip(names, teacher_paths, cfg.teachers))]  # each sample's domain
            indexes = group.apply(functools.partial(
                rank_teacher_forward, shares=split_groups(groups, cfg.learner.workers),
                teacher_paths=[str(p) for p in teacher_paths], cache_root=cache_root, round_id=r, teachers=teachers,
                policy=policy, dtype=getattr(torch, cfg.cache_dtype), shard_rows=cfg.shard_tokens,
                pad_id=tokenizer.pad_token_id, batch_size=cfg.teacher_batch_size))

        with timer("train", times):  # every rank streams its own shards in (step, teacher) order
            loads_before = group.apply(_head_loads)[0]
            sums: dict[str, float] = defaultdict(float)  # divergence summed per domain / teacher, and counts
            shares: dict[str, float] = defaultdict(float)  # each domain's share of the loss weight, summed over steps
            steps = sorted(set().union(*(step_tokens(ix) for ix in indexes)))
            passes = [step_batches(ix, cfg.batch_tokens) for ix in indexes]
            for step in steps:
                n = max(p.get(step, 0) for p in passes)
                weights = rank_weights(indexes, step, cfg.balance)  # from the whole step's counts: exact per rank
                for d, w in _domain_shares(indexes, step, weights).items():
                    shares[d] += w
                per_rank = [RankStep(rank_root(cache_root, k), r, policy, cfg.batch_tokens, step, n,
                                     tokenizer.pad_token_id, domains, _pad_teacher(indexes, step), weights[k])
                            for k in range(len(indexes))]
                out = group.train_step_ranks(per_rank, objective, denominator=1.0, label=f"round {r} step {step + 1}")
                for k, v in out.items():
                    sums[k] += v
            loads = group.apply(_release_heads)[0]
    finally:
        _drop_teachers(remote, teacher_paths)

    # ---- end of round: checkpoint first, so a kill after it never repeats the round
    group.save(ctx.checkpoint_dir, r, cfg.keep_checkpoints)
    group.apply(functools.partial(rank_prune, cache_root=cache_root, keep=cfg.keep_rounds))
    per_domain = {k.removeprefix("count/domain/"): int(v) for k, v in sorted(sums.items())
                  if k.startswith("count/domain/")}
    tokens = sum(per_domain.values())
    divergences = {k.removeprefix("sum/"): v / sums["count/" + k.removeprefix("sum/")]
                   for k, v in sums.items() if k.startswith("sum/")}
    n_bytes = sum(s["bytes"] for ix in indexes for s in ix["shards"])
    loss = sums["loss"] / max(len(steps), 1)  # each step's loss is already its balanced mean
    agent = [ro for ro in rollouts if ro.episode is not None]
    ctx.log_metrics(r, {
        "round": r,
        "loss": loss,
        **{f"{cfg.divergence}/{k}": v for k, v in sorted(divergences.items())},
        **{f"tokens/domain/{d}": n for d, n in per_domain.items()},
        **{f"weight/domain/{d}": shares[d] / max(len(steps), 1) for d in per_domain},
        "response_len/mean": sum(len(ro.response_ids) for ro in rollouts) / max(len(rollouts), 1),
        **({"agent/turns_mean": sum(ro.turns for ro in agent) / len(agent)} if agent else {}),
        "samples": len(rollouts),
        "tokens": tokens,
        "cache/bytes_per_token": n_bytes / max(tokens, 1),
        "heads/loads": loads - loads_before,  # rank 0's head reads this round
        **{k: v for k, v in synced.items() if k != "sync/bytes"},
        **times,
    })
    log.info("opd round %d: loss %.4f over %d trained tokens; per domain (tokens, share of the loss, balance %s): %s",
             r, loss, tokens, cfg.balance,
             ", ".join(f"{d} {n} {shares[d] / max(len(steps), 1):.2f}" for d, n in per_domain.items()))
    return loss


def _fetch_teachers(remote: dict[int, str], paths: list[Path], weights: bool = True) -> None:
    for i, url in remote.items():
        try:
            fetch_model(url, paths[i], weights=weights)
        except FileNotFoundError as e:
            raise UserError(f"teachers.{i}.model: {e}") from None
        log.info("teacher %d: fetched %s to %s%s", i, url, paths[i], "" if weights else " (config and tokenizer)")


def _drop_teachers(remote: dict[int, str], paths: list[Path]) -> None:
    for i in remote:
        shutil.rmtree(paths[i], ignore_errors=True)


def _domain_shares(indexes: list[dict], step: int, weights: list[list[float]]) -> dict[str, float]:
    """Each domain's share of step `step`'s loss weight (the shares sum to 1), to show the balance."""
    out: dict[str, float] = defaultdict(float)
    for ix, ws in zip(indexes, weights):
        for s, w in zip(step_samples(ix, step), ws):
            out[s["domain"]] += w * s["rows"][1]
    return out


def _pad_teacher(indexes: list[dict], step: int) -> tuple[int, int]:
    """(teacher, hidden size) of the step's first shard on any rank: what a rank with no samples pads with."""
    for ix in indexes:
        for s in ix["shards"]:
            if s["step"] == step:
                return s["teacher"], ix["teachers"][s["teacher"]]["hidden_size"]
    raise ValueError(f"no shard of step {step}")


def _head_loads(model) -> int:
    return len(model.heads.loads)


def _release_heads(model) -> int:
    """Drop the resident teacher head at the end of a round; how many heads this rank has read so far."""
    model.heads.release()
    return len(model.heads.loads)


def _check_same_tokenizer(student_tok, student_path: Path, teacher_paths: list[Path]) -> None:
    """Logit-level distillation compares distributions token by token: one vocabulary for all."""
    want = student_tok.get_vocab()
    for i, path in enumerate(teacher_paths):
        got = load_tokenizer(path).get_vocab()
        if got != want:
            differ = len(set(got.items()) ^ set(want.items()))
            raise UserError(f"teachers.{i}.model: {path} has a different tokenizer from the student {student_path} "
                            f"({len(got)} vs {len(want)} tokens, {differ} entries differ); OPD needs one vocabulary")


def _prompts_by_domain(data: list[DataConfig], route: dict[str, int]) -> dict[str, list[dict]]:
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for i, d in enumerate(data):
        for s in load_samples(d, "train"):
            if s["domain"] not in route:
                raise UserError(f"data.{i}: samples of domain {s['domain']!r} have no teacher; "
                                f"teachers cover {sorted(route)}")
            by_domain[s["domain"]].append(s)
    return dict(sorted(by_domain.items()))


def _round_prompts(by_domain: dict[str, list[dict]], r: int, n: int) -> list[dict]:
    """`n` prompts split evenly over domains, walking each domain's list round after round."""
    out = []
    per, extra = divmod(n, len(by_domain))
    for j, (domain, samples) in enumerate(by_domain.items()):
        k = per + (j < extra)
        start = (r - 1) * k
        out.extend(samples[(start + i) % len(samples)] for i in range(k))
    random.Random(r).shuffle(out)  # mixed domains in each generate batch, as a rollout engine would see
    return out
