"""Stage `base_model`: the model every expert starts from.

Either a tiny Qwen2 built from a config with a tokenizer trained on the workflow's data, or a real
Hugging Face checkpoint (a local directory or a hub id, `pipeline.hub`) given our special tokens and
chat template with its own turn markup kept (`experts.models.adopt_pretrained`). All experts and
the student share this tokenizer, which distillation needs.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator

from experts.data import DataConfig, load_samples, sample_texts
from experts.models import adopt_pretrained, build_tiny_model, load_model, load_tokenizer, param_count, save_checkpoint, train_tokenizer
from pipeline.config import MAX_LAYERS, MAX_TOKENS, MAX_VOCAB, MAX_WIDTH, ModelRef, StageConfig
from pipeline.context import MODEL_DIR, StageContext

log = logging.getLogger(__name__)
MAX_PARAMS = 1 << 31  # a model built from a config; 8 GiB of fp32 weights


class TinyModel(StageConfig):
    hidden_size: int = Field(128, ge=8, le=MAX_WIDTH, description="Width of the residual stream (8 to 65,536).")
    num_hidden_layers: int = Field(4, ge=1, le=MAX_LAYERS, description="Transformer blocks (at most 256).")
    num_attention_heads: int = Field(4, ge=1, le=MAX_LAYERS, description="Query heads (at most 256).")
    num_key_value_heads: int = Field(2, ge=1, le=MAX_LAYERS, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(384, ge=8, le=4 * MAX_WIDTH, description="MLP width (at most 262,144).")
    max_position_embeddings: int = Field(1024, ge=16, le=MAX_TOKENS, description="Longest sequence the model is built for (at most 2^20).")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                             f"{self.num_attention_heads}, and that of num_key_value_heads {self.num_key_value_heads}")
        return self


class Config(StageConfig):
    pretrained: ModelRef | None = Field(None, description="Start from this HF checkpoint (a local directory or a hub "
                                        "id, org/name[@revision]) instead of building one; our special tokens and "
                                        "chat template are added to it.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Dtype a `pretrained` checkpoint is loaded "
                                                  "and saved in (bfloat16 halves its size); training stages load "
                                                  "it in their own learner.dtype.")
    tokenizer_data: list[DataConfig] = Field(
        default_factory=lambda: [DataConfig()], description="Datasets whose text trains the tokenizer."
    )
    vocab_size: int = Field(1024, ge=300, le=MAX_VOCAB, description="BPE vocabulary size, special tokens included (at most 2^20).")
    model: TinyModel = Field(default_factory=TinyModel, description="Shape of the tiny Qwen2 (at most 2^31 parameters).")

    @model_validator(mode="after")
    def _fits(self):
        m = self.model
        params = self.vocab_size * m.hidden_size + m.num_hidden_layers * (
            4 * m.hidden_size * m.hidden_size + 3 * m.hidden_size * m.intermediate_size)
        if params > MAX_PARAMS:
            raise ValueError(f"vocab_size and model make about {params:.3g} parameters; at most {MAX_PARAMS:.3g} "
                             f"are built from a config (bring a bigger model as `pretrained`)")
        return self


def run(cfg: Config, ctx: StageContext) -> None:
    if cfg.pretrained:
        src = ctx.model_path(cfg.pretrained)
        model, tok = load_model(src, getattr(torch, cfg.dtype)), load_tokenizer(src)
        added = adopt_pretrained(model, tok)
        log.info("%s: added tokens %s; eos %r, pad %r", src, added, tok.eos_token, tok.pad_token)
    else:
        texts = [t for d in cfg.tokenizer_data for t in sample_texts(load_samples(d, "all"))]
        tok = train_tokenizer(texts, cfg.vocab_size)
        model = build_tiny_model(tok, seed=ctx.seed, **cfg.model.model_dump())
    save_checkpoint(model, tok, ctx.out_dir / MODEL_DIR)
    log.info("base model: %d parameters, vocab %d", param_count(model), len(tok))
    ctx.log_metrics(0, {"params": param_count(model), "vocab": len(tok)})
