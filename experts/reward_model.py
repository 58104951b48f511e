"""Stage `reward_model`: train a Bradley-Terry reward model on chosen/rejected pairs, as a learner group.

The model is a transformer with a scalar head (`Qwen2ForSequenceClassification`, num_labels=1)
reading the chat-templated prompt and answer; training minimises -log sigmoid(r_chosen - r_rejected)
(Bradley & Terry, 1952; the InstructGPT RM loss). With `model:` set it starts from that checkpoint
and its tokenizer, as RMs usually start from the SFT model; without, it builds a tiny Qwen2 and a
tokenizer trained on the pairs. By default the pairs come from the instruction-following checkers
(`rewards.if_data.preference_pairs`), so the quickstart needs no data.

Like every trainer it runs on a `learner.WorkerGroup` (`learner:` block); a pair's two answers stay
on one worker. Writes `<out_dir>/model` (HF checkpoint), `eval.json` (held-out pairwise accuracy),
`metrics.jsonl` and resumable `checkpoints/step_N`. `rewards.reward_model.LearnedReward` serves the
trained model as the `reward_model` reward.
"""

from __future__ import annotations

import logging
import random

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from learner.checkpoint import latest_checkpoint, truncate_metrics
from learner.config import LearnerConfig, whole_model
from learner.group import WorkerGroup
from learner.optim import Optim
from pipeline.config import (
    MAX_BATCH,
    MAX_LAYERS,
    MAX_TOKENS,
    MAX_VOCAB,
    MAX_WIDTH,
    LearningRate,
    ModelRef,
    PathRef,
    StageConfig,
    Steps,
    Tokens,
)
from pipeline.context import StageContext, atomic_write_json, timer
from rewards.reward_model import render

log = logging.getLogger(__name__)
INIT_DIR = "init"  # the starting model (a checkpoint's, or one built from scratch), as every worker loads it


class Config(StageConfig):
    model: ModelRef | None = Field(
        None, description="Start from this checkpoint and its tokenizer (a stage or HF dir); None: a tiny model from scratch."
    )
    pairs: PathRef | None = Field(
        None, description="JSONL of {messages, chosen, rejected}; None generates pairs from the IF checkers."
    )
    n_pairs: int = Field(400, gt=1, le=1_000_000, description="How many pairs to generate when `pairs` is not given.")
    pair_types: list[str] | None = Field(
        None, description="Constraint types for generated pairs (rewards.instruction.CHECKS); None: all."
    )
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="Share of pairs held out for pairwise accuracy.")
    steps: Steps = Field(80, description="Optimizer steps (at most 1,000,000).")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH // 2, description="Pairs per step (at most 32,768).")
    lr: LearningRate = Field(2e-3, description="AdamW learning rate, in (0, 1].")
    max_length: Tokens = Field(160, ge=16, description="Tokens per prompt+answer (16 to 2^20); longer ones keep their end.")
    hidden_size: int = Field(32, ge=8, le=MAX_WIDTH, description="Width of the from-scratch model (a multiple of 4, at most 65,536).")
    num_layers: int = Field(2, ge=1, le=MAX_LAYERS, description="Layers of the from-scratch model (at most 256).")
    vocab_size: int = Field(512, ge=300, le=MAX_VOCAB, description="Vocabulary of the tokenizer trained when `model` is None.")
    eval_every: Steps = Field(40, description="Log held-out accuracy every this many steps.")
    save_every: Steps = Field(40, description="Checkpoint every N steps (and at the end); a killed stage resumes.")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Newest checkpoints kept on disk.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Workers, sharding and dtype of the "
                                   "trainer; a step's pairs are split over the workers.")

    _whole_model = field_validator("learner")(whole_model)

    @model_validator(mode="after")
    def _fits(self):
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 (the model's attention heads)")
        if 2 * self.batch_size * self.max_length > MAX_TOKENS:
            raise ValueError(f"2 x batch_size x max_length = {2 * self.batch_size * self.max_length} tokens per step; "
                             f"at most {MAX_TOKENS}")
        return self


def _setup(cfg: Config, ctx: StageContext, pairs: list[dict]):
    from transformers import AutoModelForSequenceClassification, Qwen2ForSequenceClassification

    from experts.models import build_tiny_model, load_tokenizer, train_tokenizer

    if cfg.model is not None:
        path = ctx.model_path(cfg.model)
        tok = load_tokenizer(path)
        with torch.random.fork_rng(devices=[]):  # the new score head is drawn from torch's RNG: seed it, so a rerun is the same
            torch.manual_seed(ctx.seed)
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    else:
        texts = [m["content"] for p in pairs for m in p["messages"]] + [p[k] for p in pairs for k in ("chosen", "rejected")]
        tok = train_tokenizer(texts, vocab_size=cfg.vocab_size)
        config = build_tiny_model(tok, seed=ctx.seed, hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 3,
                                  num_hidden_layers=cfg.num_layers, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=False).config
        config.num_labels = 1
        torch.manual_seed(ctx.seed)
        model = Qwen2ForSequenceClassification(config)
    model.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token
    tok.truncation_side = "left"  # keep the answer's end, where violations often show
    return model, tok


def load_scorer(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """A learner loader: the sequence classifier with a scalar head."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)


def encode_pairs(tok, pairs: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask [pairs, 2, L]: row 0 the chosen answer, row 1 the rejected one."""
    texts = [render(tok, p["messages"], p[k]) for p in pairs for k in ("chosen", "rejected")]
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {k: enc[k].view(len(pairs), 2, -1) for k in ("input_ids", "attention_mask")}


def pair_scores(model, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar rewards of each pair's two answers  # [pairs, 2]"""
    out = model(input_ids=mb["input_ids"].flatten(0, 1), attention_mask=mb["attention_mask"].flatten(0, 1))
    return out.logits[:, 0].view(-1, 2)


def bt_objective(model, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The learner objective: Bradley-Terry NLL summed over the micro-batch's pairs."""
    s = pair_scores(model, mb)
    margin = s[:, 0] - s[:, 1]
    return -F.logsigmoid(margin).sum(), {"correct": float((margin > 0).sum()), "margin": float(margin.sum())}


def accuracy(group: WorkerGroup, tok, pairs: list[dict], max_length: int) -> float:
    """Share of pairs whose chosen answer the model scores above the rejected one (ties count as wrong)."""
    if not pairs:
        return float("nan")
    s = group.forward(encode_pairs(tok, pairs, max_length), pair_scores, micro_batch_size=32)
    return float((s[:, 0] > s[:, 1]).float().mean())


def resources(cfg: Config) -> dict[str, float]:
    """Ray resources the stage holds at once at most (the runner starts stages side by side that fit)."""
    return cfg.learner.resources()


def run(cfg: Config, ctx: StageContext) -> None:
    from rewards.if_data import preference_pairs, read_jsonl

    if cfg.pairs is not None:
        pairs = read_jsonl(cfg.pairs)
    else:
        types = cfg.pair_types or None
        pairs = preference_pairs(cfg.n_pairs, seed=ctx.seed, **({"types": types} if types else {}))
    random.Random(ctx.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * cfg.eval_fraction))
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    init = ctx.out_dir / INIT_DIR
    if not (init / "config.json").exists():
        from experts.models import save_checkpoint

        model, tok = _setup(cfg, ctx, pairs)
        save_checkpoint(model, tok, init)
    from experts.models import load_tokenizer

    tok = load_tokenizer(init)
    tok.truncation_side = "left"  # keep the answer's end, where violations often show
    resume = latest_checkpoint(ctx.checkpoint_dir)
    optim = Optim(lr=cfg.lr, total_steps=cfg.steps, warmup_steps=min(10, cfg.steps), min_lr_ratio=0.0, betas=(0.9, 0.999),
                  decay="linear")  # AdamW defaults and a linear decay: what this trainer always used
    group = WorkerGroup(str(init), cfg.learner, optim, loader=load_scorer, resume=str(resume) if resume else None,
                        name=ctx.name)
    start = group.step
    before = accuracy(group, tok, eval_pairs, cfg.max_length)
    if resume:
        truncate_metrics(ctx.out_dir, start)
        log.info("resuming %s from %s (step %d of %d)", ctx.name, resume.name, start, cfg.steps)
    log.info("reward_model: %d train / %d eval pairs, held-out accuracy %.3f at step %d",
             len(train_pairs), len(eval_pairs), before, start)

    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc=ctx.name, mininterval=2.0)
    for step in bar:
        times: dict[str, float] = {}  # this step's phases, not a running total
        rng = random.Random(ctx.seed * 1_000_003 + step)  # each step's pairs fixed by the step: resumable
        batch = [train_pairs[rng.randrange(len(train_pairs))] for _ in range(cfg.batch_size)]
        with timer("train", times):
            out = group.train_step(encode_pairs(tok, batch, cfg.max_length), bt_objective, denominator=len(batch),
                                   micro_batch_size=cfg.batch_size, label=f"step {step}")
        metrics = {"loss": out["loss"] / len(batch), "train/pairwise_accuracy": out["correct"] / len(batch),
                   "train/margin": out["margin"] / len(batch), "grad_norm": out["grad_norm"], "lr": out["lr"]}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with timer("eval", times):
                metrics["eval/pairwise_accuracy"] = accuracy(group, tok, eval_pairs, cfg.max_length)
            log.info("reward_model step %d: loss %.4f, held-out accuracy %.3f", step, metrics["loss"],
                     metrics["eval/pairwise_accuracy"])
        ctx.log_metrics(step, {**metrics, **times})
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['train/pairwise_accuracy']:.2f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            group.save(ctx.checkpoint_dir, step, cfg.keep_checkpoints)

    by_type: dict[str, list[dict]] = {}
    for p in eval_pairs:
        by_type.setdefault(p.get("violated", "all"), []).append(p)
    report = {
        "pairwise_accuracy": accuracy(group, tok, eval_pairs, cfg.max_length),
        "pairwise_accuracy_before_training": before if not resume else None,
        "n_train": len(train_pairs),
        "n_eval": len(eval_pairs),
        "by_violated": {k: accuracy(group, tok, v, cfg.max_length) for k, v in sorted(by_type.items())},
    }
    atomic_write_json(ctx.out_dir / "eval.json", report)
    group.save_hf(ctx.out_dir / "model", str(init))
    group.close()
    log.info("reward_model: held-out pairwise accuracy %.3f (before training %s)", report["pairwise_accuracy"],
             report["pairwise_accuracy_before_training"])
