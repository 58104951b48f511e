"""Stage `sft`: supervised fine-tuning of one domain expert, loss on assistant tokens only.

Set-up (tokenise, plan batches, start the learner group), one loop of optimizer steps, save.
The learner is a `learner.WorkerGroup` (`learner:` block: workers, FSDP2 or DDP, dtype); the loop
hands it each step's rows and `sft_loss`, and never knows how many workers there are. With
`learner.lora` only LoRA adapters train, and `model/` is the merged plain checkpoint (docs/grpo.md).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from experts.data import DataConfig, check_mix, domain_plan, load_samples
from experts.models import load_tokenizer
from learner.batching import batch_plan
from learner.checkpoint import latest_checkpoint, truncate_metrics
from learner.config import LearnerConfig
from learner.group import WorkerGroup
from learner.optim import Optim
from pipeline.config import MAX_BATCH, MAX_TOKENS, BatchSize, LearningRate, ModelRef, StageConfig, Steps, Tokens
from pipeline.context import MODEL_DIR, StageContext, timer

log = logging.getLogger(__name__)
IGNORE = -100


class Config(StageConfig):
    model: ModelRef = Field(description="Starting checkpoint: a stage name or a local HF checkpoint dir.")
    data: list[DataConfig] = Field(
        default_factory=lambda: [DataConfig()],
        description="Training samples (their `completion` is the target); one source or a list to mix domains.",
    )
    steps: Steps = Field(200, description="Optimizer steps (at most 1,000,000).")
    batch_size: BatchSize = Field(16, description="Sequences (or packed rows) per micro-batch (at most 65,536).")
    grad_accum: BatchSize = Field(1, description="Micro-batches per optimizer step (at most 65,536).")
    max_len: Tokens = Field(256, ge=8, description="Longest sequence in tokens (8 to 2^20); longer samples are cut. "
                                                 "batch_size x max_len is at most 2^20 tokens.")
    packing: bool = Field(False, description="Concatenate samples into full rows of max_len instead of padding.")
    mix: dict[str, float] = Field(default_factory=dict, description="Domain -> share of every step's rows, e.g. "
                                  "{math: 3, code: 1} (normalised); each domain repeats its own samples as needed. "
                                  "Empty: rows are drawn from all samples alike, so domains weigh by their size.")
    lr: LearningRate = Field(1e-3, description="Peak learning rate (AdamW), in (0, 1].")
    warmup_steps: int = Field(10, ge=0, le=1_000_000, description="Linear warmup steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays the LR to lr * min_lr_ratio.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay (at most 10).")
    max_grad_norm: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    save_every: Steps = Field(50, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Newest checkpoints kept on disk.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Workers, sharding and dtype of "
                                   "the trainer. A step trains batch_size x grad_accum rows in all, split over the "
                                   "workers by tokens; each worker runs micro-batches of at most batch_size rows.")

    @model_validator(mode="after")
    def _batch_fits(self):
        if self.batch_size * self.max_len > MAX_TOKENS:
            raise ValueError(f"batch_size x max_len = {self.batch_size * self.max_len} tokens per micro-batch; "
                             f"at most {MAX_TOKENS}")
        check_mix(self.mix, self.data)
        if self.mix and self.packing:
            raise ValueError("mix needs packing: false (a packed row holds samples of several domains)")
        if self.batch_size * self.grad_accum > MAX_BATCH:
            raise ValueError(f"batch_size x grad_accum = {self.batch_size * self.grad_accum} sequences per step; "
                             f"at most {MAX_BATCH}")
        return self

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, dict) else v


def encode_sft(tokenizer, sample: dict, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion, and labels that are IGNORE on the prompt.

    A sample's `meta.followup` (a list of {role: tool | assistant, content}) continues the completion
    as an episode would: each tool observation rendered exactly as `rollout.episodes` feeds it back
    (masked: context, not a target), each assistant turn a target ending with the end-of-turn token.

    Prompt and completion are tokenised apart, exactly as at generation time, so the mask
    boundary is exact and no BPE merge crosses it. The target ends with the end-of-turn token.
    """
    prompt = tokenizer.apply_chat_template(sample["messages"], add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(sample["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    c_labels = list(c_ids)
    for turn in sample.get("meta", {}).get("followup", []):  # later turns of an agent episode
        if turn["role"] == "tool":  # the observation, as an episode renders it: context, never a target
            from rollout.episodes import tool_turn_ids

            t_ids = tool_turn_ids(tokenizer, turn["content"], think=True)
            c_ids, c_labels = c_ids + t_ids, c_labels + [IGNORE] * len(t_ids)
        else:
            t_ids = tokenizer(turn["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            c_ids, c_labels = c_ids + t_ids, c_labels + t_ids
    ids = (p_ids + c_ids)[:max_len]
    labels = ([IGNORE] * len(p_ids) + c_labels)[:max_len]
    return ids, labels


def build_rows(tokenizer, samples: list[dict], max_len: int, packing: bool) -> list[tuple[list[int], list[int]]]:
    """Encoded samples, or with `packing` their concatenation cut into rows of `max_len`.

    Shortcut: packed rows share one causal mask, so a sample may attend to the one before it
    (as TRL's ConstantLengthDataset did). Fine for short samples; turn packing off if not.
    """
    encoded = [encode_sft(tokenizer, s, max_len) for s in samples if s.get("completion") is not None]
    if not encoded:
        raise ValueError("no sample has a `completion` to train on")
    if not packing:
        return encoded
    flat_ids = [t for ids, _ in encoded for t in ids]
    flat_lab = [t for _, lab in encoded for t in lab]
    return [(flat_ids[i : i + max_len], flat_lab[i : i + max_len]) for i in range(0, len(flat_ids), max_len)]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into input_ids / attention_mask / labels, each [batch, longest]."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r_ids, r_lab) in enumerate(rows):
        ids[i, : len(r_ids)] = torch.tensor(r_ids)
        labels[i, : len(r_lab)] = torch.tensor(r_lab)
        mask[i, : len(r_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The learner objective: summed cross-entropy over labelled tokens (the group divides by all of them)."""
    loss, n = token_loss_sum(model, batch)
    return loss, {"tokens": n}


def optim(cfg: Config) -> Optim:
    return Optim(lr=cfg.lr, total_steps=cfg.steps, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                 min_lr_ratio=cfg.min_lr_ratio, max_grad_norm=cfg.max_grad_norm)


def train_step(group: WorkerGroup, rows: list[tuple[list[int], list[int]]], cfg: Config, pad_id: int) -> dict[str, float]:
    """One optimizer step on `rows`: every labelled token counts once, whichever worker and micro-batch has it."""
    batch = collate(rows, pad_id)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    out = group.train_step(batch, sft_loss, denominator=max(1, n), micro_batch_size=cfg.batch_size)
    return {"loss": out["loss"] / max(1, n), "grad_norm": out["grad_norm"], "lr": out["lr"], "tokens": n}


def resources(cfg: Config) -> dict[str, float]:
    """Ray resources the stage holds at once at most (the runner starts stages side by side that fit)."""
    return cfg.learner.resources()


def run(cfg: Config, ctx: StageContext) -> None:
    model_path = ctx.model_path(cfg.model)
    tok = load_tokenizer(model_path)
    samples = [s for d in cfg.data for s in load_samples(d, "train", need_completion=True)]
    rows = build_rows(tok, samples, cfg.max_len, cfg.packing)
    if cfg.mix:  # rows are the samples, in order (no packing)
        plan = domain_plan(cfg.mix, samples, cfg.batch_size * cfg.grad_accum, cfg.steps, ctx.seed)
    else:
        plan = batch_plan(len(rows), cfg.batch_size * cfg.grad_accum, cfg.steps, ctx.seed)
    resume = latest_checkpoint(ctx.checkpoint_dir)
    group = WorkerGroup(str(model_path), cfg.learner, optim(cfg), resume=str(resume) if resume else None, name=ctx.name)
    start = group.step
    if resume:
        truncate_metrics(ctx.out_dir, start)
        log.info("resuming %s from %s (step %d of %d)", ctx.name, resume.name, start, cfg.steps)
    log.info("sft %s: %d rows, %d steps of %d rows", ctx.name, len(rows), cfg.steps, cfg.batch_size * cfg.grad_accum)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=ctx.name, mininterval=2.0)
    for step in bar:
        times: dict[str, float] = {}
        with timer("train", times):
            metrics = train_step(group, [rows[i] for i in plan[step]], cfg, tok.pad_token_id)
        ctx.log_metrics(step + 1, {**metrics, **times})
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            with timer("save", times):
                group.save(ctx.checkpoint_dir, step + 1, cfg.keep_checkpoints)

    group.save_hf(ctx.out_dir / MODEL_DIR, str(model_path))
    group.close()
