"""Tiny models and tokenizers built from data, and loading/saving of Hugging Face checkpoints.

There is no model hub here, so a workflow's first stage trains a byte-level BPE tokenizer on its
own data and builds a small Qwen2 from a config. Every later stage reads and writes plain HF
checkpoints (safetensors + tokenizer), so a GPU user swaps in a real model by giving its path.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from pipeline.config import UserError
from pipeline.context import atomic_dir

log = logging.getLogger(__name__)

# Control tokens: never produced by splitting text, removed by decode(skip_special_tokens=True).
PAD, BOS_TURN, EOS_TURN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Markup the model writes and rewards parse: kept by decode so checkers see it.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"
TOOL_RESULT_OPEN, TOOL_RESULT_CLOSE = "<|tool_result|>", "<|/tool_result|>"
CONTROL_TOKENS = [PAD, BOS_TURN, EOS_TURN] + [f"<|reserved_{i}|>" for i in range(8)]
MARKUP_TOKENS = [THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESULT_OPEN, TOOL_RESULT_CLOSE]

# Roles: system, user, assistant, tool. An assistant message may carry `reasoning_content`,
# rendered as a think block and kept on every turn, so reasoning survives across tool calls.
# `enable_thinking=False` pre-fills an empty think block (the recipe's non-think mode).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'tool' %}"
    "{{ '<|tool_result|>' + m['content'] + '<|/tool_result|>' }}"
    "{% else %}"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}"
    "{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n' }}"
    "{% endif %}"
    "{{ m['content'] }}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n</think>\\n' }}{% endif %}"
    "{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, with our chat template and special tokens.

    Digits are split one per token (as Llama does) so arithmetic is not hidden inside merges.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CONTROL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TURN,
        pad_token=PAD,
        additional_special_tokens=CONTROL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
    # Markup tokens are whole tokens, but decode keeps them so rewards can parse the response.
    fast.add_tokens(MARKUP_TOKENS)
    return fast


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """A Qwen2 of about a million parameters, sized to `tokenizer` (override any Qwen2Config field)."""
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    with _loading(path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"  # generation pads on the left; training builds its own batches
    return tok


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    with _loading(path, "model"):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


@contextmanager
def _loading(path: str | Path, what: str) -> Iterator[None]:
    """A checkpoint that cannot load (garbage config.json, missing weights) is one line naming it."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot load a Hugging Face {what}: {str(e).strip().splitlines()[0][:300]}") from None


def save_checkpoint(model: torch.nn.Module, tokenizer, path: str | Path) -> Path:
    """Write an HF checkpoint (safetensors + tokenizer) atomically: `path` is whole or absent."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return path


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
