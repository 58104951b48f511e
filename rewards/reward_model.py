"""Stage `reward_model`: train a Bradley-Terry reward model on chosen/rejected pairs; serve it as a reward.

The model is a transformer with a scalar head (`Qwen2ForSequenceClassification`, num_labels=1)
reading the chat-templated prompt and answer; training minimises -log sigmoid(r_chosen - r_rejected)
(Bradley & Terry, 1952; the InstructGPT RM loss). With `model:` set it starts from that checkpoint
and its tokenizer, as RMs usually start from the SFT model; without, it builds a tiny Qwen2 and a
tokenizer trained on the pairs. By default the pairs come from the instruction-following checkers
(`rewards.if_data.preference_pairs`), so the quickstart needs no data.

Writes `<out_dir>/model` (HF checkpoint), `eval.json` (held-out pairwise accuracy) and
`metrics.jsonl`. `LearnedReward(path)` is the `reward_model` reward: it scores the visible answer.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

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
from rewards.base import RewardResult, Sample
from rewards.format import answer_text

log = logging.getLogger(__name__)


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

    @model_validator(mode="after")
    def _fits(self):
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 (the model's attention heads)")
        if 2 * self.batch_size * self.max_length > MAX_TOKENS:
            raise ValueError(f"2 x batch_size x max_length = {2 * self.batch_size * self.max_length} tokens per step; "
                             f"at most {MAX_TOKENS}")
        return self


def render(tokenizer, messages: Sequence[dict[str, Any]], answer: str) -> str:
    """The text the RM reads: the prompt and the answer in the chat template."""
    return tokenizer.apply_chat_template(list(messages) + [{"role": "assistant", "content": answer}], tokenize=False)


def score_texts(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 32) -> torch.Tensor:
    """Scalar rewards for `texts`  # [len(texts)]"""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        out.append(model(**enc).logits[:, 0])
    return torch.cat(out) if out else torch.zeros(0)


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood that chosen beats rejected, averaged  # [pairs] -> []

    >>> round(bt_loss(torch.tensor([0.0]), torch.tensor([0.0])).item(), 4)  # log 2: no preference yet
    0.6931
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pairwise_accuracy(model, tokenizer, pairs: Sequence[dict], max_length: int) -> float:
    """Share of pairs where the model scores chosen above rejected (ties count as wrong)."""
    with torch.no_grad():
        c = score_texts(model, tokenizer, [render(tokenizer, p["messages"], p["chosen"]) for p in pairs], max_length)
        r = score_texts(model, tokenizer, [render(tokenizer, p["messages"], p["rejected"]) for p in pairs], max_length)
    return float((c > r).float().mean()) if len(pairs) else float("nan")


def _setup(cfg: Config, ctx: StageContext, pairs: list[dict]):
    from transformers import AutoModelForSequenceClassification, Qwen2ForSequenceClassification

    from experts.models import build_tiny_model, load_tokenizer, train_tokenizer

    if cfg.model is not None:
        path = ctx.model_path(cfg.model)
        tok = load_tokenizer(path)
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


def run(cfg: Config, ctx: StageContext) -> None:
    from experts.models import save_checkpoint
    from learner.optim import check_finite
    from rewards.if_data import preference_pairs, read_jsonl

    rng = random.Random(ctx.seed)
    if cfg.pairs is not None:
        pairs = read_jsonl(cfg.pairs)
    else:
        types = cfg.pair_types or None
        pairs = preference_pairs(cfg.n_pairs, seed=ctx.seed, **({"types": types} if types else {}))
    rng.shuffle(pairs)
    n_eval = max(1, int(len(pairs) * cfg.eval_fraction))
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    model, tok = _setup(cfg, ctx, pairs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / cfg.steps))
    before = pairwise_accuracy(model.eval(), tok, eval_pairs, cfg.max_length)
    log.info("reward_model: %d train / %d eval pairs, held-out accuracy before training %.3f",
             len(train_pairs), len(eval_pairs), before)

    times: dict[str, float] = {}
    for step in range(1, cfg.steps + 1):
        batch = [train_pairs[rng.randrange(len(train_pairs))] for _ in range(cfg.batch_size)]
        with timer("train", times):
            model.train()
            texts = [render(tok, p["messages"], p["chosen"]) for p in batch] + [
                render(tok, p["messages"], p["rejected"]) for p in batch]
            scores = score_texts(model, tok, texts, cfg.max_length, batch_size=len(texts))
            r_c, r_r = scores[: len(batch)], scores[len(batch):]
            loss = bt_loss(r_c, r_r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            check_finite(f"step {step}", loss=loss, grad_norm=grad_norm)
            opt.step()
            sched.step()
        metrics = {"loss": loss.item(), "train/pairwise_accuracy": (r_c > r_r).float().mean().item(),
                   "train/margin": (r_c - r_r).mean().item(), **times}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with timer("eval", times):
                metrics["eval/pairwise_accuracy"] = pairwise_accuracy(model.eval(), tok, eval_pairs, cfg.max_length)
            log.info("reward_model step %d: loss %.4f, held-out accuracy %.3f", step, metrics["loss"],
                     metrics["eval/pairwise_accuracy"])
        ctx.log_metrics(step, metrics)

    model.eval()
    by_type: dict[str, list[dict]] = {}
    for p in eval_pairs:
        by_type.setdefault(p.get("violated", "all"), []).append(p)
    report = {
        "pairwise_accuracy": pairwise_accuracy(model, tok, eval_pairs, cfg.max_length),
        "pairwise_accuracy_before_training": before,
        "n_train": len(train_pairs),
        "n_eval": len(eval_pairs),
        "by_violated": {k: pairwise_accuracy(model, tok, v, cfg.max_length) for k, v in sorted(by_type.items())},
    }
    atomic_write_json(ctx.out_dir / "eval.json", report)
    save_checkpoint(model, tok, ctx.out_dir / "model")
    log.info("reward_model: held-out pairwise accuracy %.3f (before training %.3f)", report["pairwise_accuracy"], before)


class LearnedReward:
    """The `reward_model` reward: a trained RM's scalar score of each sample's visible answer."""

    name = "reward_model"

    def __init__(self, path: str, batch_size: int = 32, max_length: int = 512):
        from transformers import AutoModelForSequenceClassification

        from experts.models import load_tokenizer

        self.tokenizer = load_tokenizer(path)
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        self.batch_size, self.max_length = batch_size, max_length

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        texts = [render(self.tokenizer, s.get("messages") or [], answer_text(s["completion"])) for s in samples]
        with torch.no_grad():
            scores = score_texts(self.model, self.tokenizer, texts, self.max_length, self.batch_size)
        return [RewardResult(float(x)) for x in scores]
