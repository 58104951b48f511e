"""Stage `opd`: merge domain experts into one student by on-policy distillation (DeepSeek-V4 recipe).

Each round: the student samples responses to prompts from every domain (generate); each teacher in
turn encodes the samples of its domains and its last-layer states go to the cache (teacher_forward);
the student then streams the cache teacher by teacher and minimises the per-token divergence to the
teacher of each sample's domain, with one teacher LM head in memory at a time (train).

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
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.cache import CacheReader, CacheWriter, prune_rounds
from distill.heads import HeadStore
from distill.loss import distill_loss
from distill.rollout import Rollout, RolloutFn, generate_rollouts, response_hidden, write_teacher_cache
from experts.data import DataConfig, load_samples
from experts.models import load_model, load_tokenizer, save_checkpoint
from learner.optim import check_finite
from pipeline.config import MAX_BATCH, BatchSize, LearningRate, ModelRef, StageConfig, Steps, Tokens, UserError
from pipeline.context import MODEL_DIR, StageContext, atomic_dir, atomic_write_json, timer

log = logging.getLogger(__name__)


class TeacherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelRef = Field(description="The expert checkpoint: a stage name or an HF checkpoint directory.")
    domains: list[str] = Field(min_length=1, description="Domains whose prompts this teacher answers for.")
    name: str | None = Field(None, description="Name in metrics and logs; defaults to `model`.")


class Config(StageConfig):
    student: ModelRef = Field(description="Checkpoint the student starts from; must share the teachers' tokenizer.")
    teachers: list[TeacherConfig] = Field(min_length=1, description="Experts, each with the domains it answers for.")
    data: list[DataConfig] = Field(min_length=1, description="Prompt sources; a sample's domain picks its teacher.")
    rounds: Steps = Field(4, description="Rounds of generate -> teacher forward -> train (at most 1,000,000).")
    prompts_per_round: BatchSize = Field(64, description="Prompts sampled per round, split evenly over domains (at most 65,536).")
    max_new_tokens: Tokens = Field(64, description="Longest student response (at most 2^20 tokens).")
    temperature: float = Field(1.0, gt=0, description="Student sampling temperature (on-policy: keep 1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Student nucleus sampling.")
    generate_batch_size: BatchSize = Field(32, description="Prompts per `generate` call.")
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
    beta: float = Field(0.5, gt=0, lt=1, description="JSD interpolation (divergence: jsd).")
    loss_temperature: float = Field(1.0, gt=0, description="Softmax temperature of both models in the loss.")
    chunk_size: Tokens = Field(512, description="Tokens per logits chunk in the loss (peak memory ~ chunk x vocab).")
    cache_url: str | None = Field(None, description="Where the teacher cache goes: a local dir or fsspec URL; "
                                                    "default <out_dir>/cache.")
    cache_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Dtype of cached states.")
    shard_tokens: Tokens = Field(65536, description="Response tokens per cache shard (at most, roughly).")
    keep_rounds: int = Field(1, ge=0, le=1000, description="Finished rounds' caches to keep; 0 deletes each after training.")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu' or 'cuda'.")

    @model_validator(mode="after")
    def _one_teacher_per_domain(self):
        owner: dict[str, int] = {}
        for i, t in enumerate(self.teachers):
            for d in t.domains:
                if d in owner:
                    raise ValueError(f"domain {d!r} is claimed by teachers {owner[d]} and {i}")
                owner[d] = i
        return self


def run(cfg: Config, ctx: StageContext, rollout_fn: RolloutFn = generate_rollouts) -> None:
    """Distil the teachers into the student for `cfg.rounds` rounds; resume from the last round checkpoint."""
    # ---- set-up: resolve models, check tokenizers, route prompts, resume
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    teacher_paths = [ctx.model_path(t.model) for t in cfg.teachers]
    names = [t.name or t.model for t in cfg.teachers]
    route = {d: i for i, t in enumerate(cfg.teachers) for d in t.domains}
    tokenizer = load_tokenizer(ctx.model_path(cfg.student))
    _check_same_tokenizer(tokenizer, ctx.model_path(cfg.student), teacher_paths)
    by_domain = _prompts_by_domain(cfg.data, route)
    cache_root = cfg.cache_url or str(ctx.out_dir / "cache")

    start, student_path = _resume_point(ctx.checkpoint_dir, ctx.model_path(cfg.student))
    student = load_model(student_path).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if (student_path / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(student_path / "optimizer.pt", map_location=device))
    heads = HeadStore(teacher_paths, device=device)
    log.info("opd: %d teachers, %d domains, rounds %d..%d, cache %s", len(names), len(by_domain), start, cfg.rounds,
             cache_root)

    for r in range(start, cfg.rounds + 1):
        times: dict[str, float] = {}
        policy = str(student_path)  # the cache of this round is valid only for this student
        samples = _round_prompts(by_domain, r, cfg.prompts_per_round)

        with timer("generate", times):
            rollouts = rollout_fn(student, tokenizer, samples, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.generate_batch_size,
                                  seed=ctx.seed * 100003 + r)

        with timer("teacher_forward", times):
            groups: dict[tuple[int, int], list[Rollout]] = defaultdict(list)  # (teacher, step) -> rollouts
            for i, ro in enumerate(rollouts):
                groups[(route[ro.domain], i % cfg.steps_per_round)].append(ro)
            teachers = [{"name": n, "path": str(p), "domains": list(t.domains)}  # the cache checks each sample's
                        for n, p, t in zip(names, teacher_paths, cfg.teachers)]     # domain against its teacher
            writer = CacheWriter(cache_root, r, teachers, policy=policy, dtype=getattr(torch, cfg.cache_dtype),
                                 shard_rows=cfg.shard_tokens)
            write_teacher_cache(groups, teacher_paths, writer, tokenizer.pad_token_id, load_model,
                                cfg.teacher_batch_size, device)
            index = writer.close()

        with timer("train", times):
            student.train()
            head_loads = len(heads.loads)
            sums: dict[str, float] = defaultdict(float)  # divergence summed per domain / teacher, and counts
            counts: dict[str, int] = defaultdict(int)
            reader = CacheReader(cache_root, r, policy=policy, batch_tokens=cfg.batch_tokens)
            step_tokens, step = reader.step_tokens(), None
            for batch in reader:  # (step, teacher) order: one head swap per teacher per step
                if batch.step != step and step is not None:
                    _optimizer_step(student, optimizer, cfg.max_grad_norm, f"round {r} step {step + 1}")
                step = batch.step
                hs = response_hidden(student, batch.input_ids, batch.prompt_lens, tokenizer.pad_token_id)
                # no local name for the head: a leftover reference would keep two heads alive at a swap
                out = distill_loss(hs, student.get_output_embeddings().weight, batch.hidden.to(device),
                                   heads.get(batch.teacher),
                                   divergence=cfg.divergence, temperature=cfg.loss_temperature, beta=cfg.beta,
                                   chunk_size=cfg.chunk_size)
                (out.loss * (len(hs) / step_tokens[step])).backward()  # the step's loss is its token mean
                for domain, div in zip(batch.domains, out.per_token.split(batch.response_lens)):
                    for key in (f"domain/{domain}", f"teacher/{names[batch.teacher]}"):
                        sums[key] += div.sum().item()
                        counts[key] += len(div)
            if step is not None:
                _optimizer_step(student, optimizer, cfg.max_grad_norm, f"round {r} step {step + 1}")
            heads.release()

        # ---- end of round: checkpoint first, so a kill after it never repeats the round
        ckpt = _save_round(student, tokenizer, optimizer, ctx.checkpoint_dir / f"round_{r}", r)
        student_path = ckpt
        prune_rounds(cache_root, cfg.keep_rounds)
        tokens = sum(counts[k] for k in counts if k.startswith("domain/"))
        n_bytes = sum(s["bytes"] for s in index["shards"])
        ctx.log_metrics(r, {
            "round": r,
            "loss": sum(v for k, v in sums.items() if k.startswith("domain/")) / max(tokens, 1),
            **{f"{cfg.divergence}/{k}": sums[k] / counts[k] for k in sorted(sums)},
            "response_len/mean": sum(len(ro.response_ids) for ro in rollouts) / max(len(rollouts), 1),
            "samples": len(rollouts),
            "tokens": tokens,
            "cache/bytes_per_token": n_bytes / max(tokens, 1),
            "heads/loads": len(heads.loads) - head_loads,
            **times,
        })
        log.info("opd round %d: loss %.4f over %d tokens", r, sum(v for k, v in sums.items() if k.startswith("domain/"))
                 / max(tokens, 1), tokens)

    save_checkpoint(student, tokenizer, ctx.out_dir / MODEL_DIR)


def _optimizer_step(model, optimizer, max_grad_norm: float, at: str) -> None:
    check_finite(at, grad_norm=torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))  # NaN loss: NaN norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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


def _resume_point(checkpoint_dir: Path, initial: Path) -> tuple[int, Path]:
    """(first round to run, checkpoint the student starts from): after the last whole round checkpoint."""
    done = sorted(int(p.name.split("_")[1]) for p in checkpoint_dir.glob("round_*") if (p / "state.json").exists())
    if not done:
        return 1, Path(initial)
    last = checkpoint_dir / f"round_{done[-1]}"
    log.info("opd: resuming after round %d from %s", done[-1], last)
    return done[-1] + 1, last


def _save_round(student, tokenizer, optimizer, path: Path, r: int) -> Path:
    with atomic_dir(path) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", {"round": r})
    return path
