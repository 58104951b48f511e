"""Stage `base_model`: the model every expert starts from.

Either a tiny Qwen2 built from a config with a tokenizer trained on the workflow's data (no model
hub here), or a copy of a local Hugging Face checkpoint (how a GPU user brings a real model).
All experts and the student share this tokenizer, which distillation needs.
"""

from __future__ import annotations

import logging

from pydantic import Field

from experts.data import DataConfig, load_samples, sample_texts
from experts.models import build_tiny_model, load_model, load_tokenizer, param_count, save_checkpoint, train_tokenizer
from pipeline.config import ModelRef, StageConfig
from pipeline.context import MODEL_DIR, StageContext

log = logging.getLogger(__name__)


class TinyModel(StageConfig):
    hidden_size: int = Field(128, ge=8, description="Width of the residual stream.")
    num_hidden_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_attention_heads: int = Field(4, ge=1, description="Query heads.")
    num_key_value_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(384, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(1024, ge=16, description="Longest sequence the model is built for.")


class Config(StageConfig):
    pretrained: ModelRef | None = Field(None, description="Copy this local HF checkpoint instead of building one.")
    tokenizer_data: list[DataConfig] = Field(
        default_factory=lambda: [DataConfig()], description="Datasets whose text trains the tokenizer."
    )
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary size, special tokens included.")
    model: TinyModel = Field(default_factory=TinyModel, description="Shape of the tiny Qwen2.")


def run(cfg: Config, ctx: StageContext) -> None:
    if cfg.pretrained:
        src = ctx.model_path(cfg.pretrained)
        model, tok = load_model(src), load_tokenizer(src)
    else:
        texts = [t for d in cfg.tokenizer_data for t in sample_texts(load_samples(d, "all"))]
        tok = train_tokenizer(texts, cfg.vocab_size)
        model = build_tiny_model(tok, seed=ctx.seed, **cfg.model.model_dump())
    save_checkpoint(model, tok, ctx.out_dir / MODEL_DIR)
    log.info("base model: %d parameters, vocab %d", param_count(model), len(tok))
    ctx.log_metrics(0, {"params": param_count(model), "vocab": len(tok)})
