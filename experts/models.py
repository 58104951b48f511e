"""Tiny models and tokenizers built from data, and loading/saving of Hugging Face checkpoints.

A workflow's first stage either trains a byte-level BPE tokenizer on its own data and builds a
small Qwen2 from a config, or adopts a real checkpoint (`adopt_pretrained`: our special tokens and
chat template added, its own turn markup kept). Every later stage reads and writes plain HF
checkpoints (safetensors + tokenizer).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
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
# `enable_thinking=False` pre-fills an empty think block (the recipe's non-think mode). A tool
# message's content goes inside tool-result markers. Turn markup comes from a `ChatMarkup`: ours is
# ChatML; a real checkpoint keeps its own (`read_markup`). @NAME@ are filled in by `chat_template`.
_TEMPLATE = (
    "{% if messages and messages[0]['role'] != 'tool' %}{{ @PREFIX@ }}"
    "{% if messages[0]['role'] != 'system' %}{{ @DEFAULT_SYSTEM@ }}{% endif %}"
    "{% endif %}"
    "{% for m in messages %}"
    "{{ @OPEN@ + (@ASSISTANT@ if m['role'] == 'assistant' else m['role']) + @SEP@ }}"
    "{% if m['role'] == 'tool' %}"
    "{{ '<|tool_result|>' + m['content'] + '<|/tool_result|>' }}"
    "{% else %}"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}"
    "{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n' }}"
    "{% endif %}"
    "{{ m['content'] }}"
    "{% endif %}"
    "{{ @CLOSE@ }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ @OPEN@ + @ASSISTANT@ + @SEP@ }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n</think>\\n' }}{% endif %}"
    "{% endif %}"
)


@dataclass(frozen=True)
class ChatMarkup:
    """How a chat template marks a turn: `open + role + sep`, the content, then `close`.

    close starts with the end-of-turn token, which is the tokenizer's eos (rollouts stop on it).
    prefix: text before the first turn (a BOS token). default_system: the system turn a model's own
    template writes when a chat has none (Qwen2.5's "You are Qwen..."), kept because the model was
    tuned with it. A chat that starts with a tool message is a continuation (`rollout.episodes`
    renders one after each tool call) and gets neither.
    """

    open: str = BOS_TURN
    sep: str = "\n"
    close: str = EOS_TURN + "\n"
    assistant: str = "assistant"  # the assistant's name in its header (Gemma's is "model")
    prefix: str = ""
    default_system: str = ""


CHATML = ChatMarkup()


def chat_template(markup: ChatMarkup = CHATML) -> str:
    """Our chat template (think blocks, tool results, non-think pre-fill) with `markup`'s turns."""
    out = _TEMPLATE
    for name, value in vars(markup).items():
        out = out.replace(f"@{name.upper()}@", json.dumps(value))  # a JSON string is a Jinja string literal
    return out


CHAT_TEMPLATE = chat_template(CHATML)

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


def read_markup(tokenizer) -> ChatMarkup | None:
    """The turn markup of `tokenizer`'s own chat template, or None where it has none that
    `chat_template` reproduces exactly (no template, no per-role headers, no end-of-turn token).

    Read off a rendered user, assistant, user chat (an assistant turn before the last user turn:
    Qwen3's template adds an empty think block to a final one), then checked: our template with this
    markup must write that chat character for character, so the model meets only markup it was tuned on.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = ("USER-7f3a9c", "ASSISTANT-7f3a9c", "AGAIN-7f3a9c")  # contents no template rewrites
    chat = [{"role": r, "content": c} for r, c in zip(("user", "assistant", "user"), probe)]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception as e:  # a template may raise anything (jinja's raise_exception); then it is not ours to read
        log.info("cannot render the checkpoint's chat template (%s)", e)
        return None
    if not isinstance(text, str) or any(text.count(c) != 1 for c in probe):
        return None
    pre, rest = text.split(probe[0])
    to_assistant, rest = rest.split(probe[1])
    to_user, close = rest.split(probe[2])  # each gap is the turn's close, then the next turn's header
    if not close or not to_assistant.startswith(close) or not to_user.startswith(close):
        return None
    assistant_header, user_header = to_assistant[len(close):], to_user[len(close):]
    open_, found, sep = user_header.partition("user")
    name = assistant_header[len(open_): len(assistant_header) - len(sep)]
    if not found or not pre.endswith(user_header) or assistant_header != open_ + name + sep or not name.strip():
        return None
    preamble = pre[: len(pre) - len(user_header)]
    bos = tokenizer.bos_token or ""
    prefix = bos if bos and preamble.startswith(bos) else ""
    markup = ChatMarkup(open_, sep, close, name, prefix, preamble[len(prefix):])
    if tokenizer.apply_chat_template(chat, tokenize=False, chat_template=chat_template(markup)) != text:
        return None
    end = tokenizer(close, add_special_tokens=False)["input_ids"][:1]
    if not end or tokenizer.convert_ids_to_tokens(end[0]) not in tokenizer.get_added_vocab():
        return None  # a turn that ends in plain text gives generation nothing to stop on
    return markup


def adopt_pretrained(model: torch.nn.Module, tokenizer) -> list[str]:
    """Give a real checkpoint what our stages expect, in place; returns the tokens added.

    - Our markup tokens (think, tool call, tool result) as whole, non-special tokens, so decode keeps
      them for the rewards and the tool-call parser; a pad token if it has none.
    - Our chat template with the checkpoint's own turn markup (`read_markup`); a checkpoint with no
      markup we can reproduce gets ChatML's, its two tokens added.
    - eos: the end-of-turn token (rollouts and SFT targets end on it). An instruction-tuned
      checkpoint's eos already is; a different old eos stays a stop token in generation_config.
    - Embeddings (and an untied lm_head) grown to the new vocabulary, each new row the mean of the
      trained rows, so a new token starts as an average token rather than noise.
    """
    trained = len(tokenizer)
    vocab = tokenizer.get_vocab()
    markup = read_markup(tokenizer)
    if markup is None:
        log.warning("the checkpoint has no chat template whose turns can be reproduced; using ChatML's")
        markup = CHATML
    specials = [t for t in ([PAD] if tokenizer.pad_token is None else []) +
                ([BOS_TURN, EOS_TURN] if markup is CHATML else []) if t not in vocab]
    tokenizer.add_tokens(specials, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
    markup_tokens = [t for t in MARKUP_TOKENS if t not in vocab]
    tokenizer.add_tokens(markup_tokens)
    hidden = [t for t in MARKUP_TOKENS if t in tokenizer.all_special_tokens]
    if hidden:
        log.warning("the checkpoint has %s as special tokens: decode(skip_special_tokens=True) drops them, "
                    "so rewards that parse them will not see them", hidden)
    tokenizer.chat_template = chat_template(markup)

    turn_end = tokenizer.convert_ids_to_tokens(tokenizer(markup.close, add_special_tokens=False)["input_ids"][0])
    old_eos = tokenizer.eos_token
    if old_eos != turn_end:
        log.info("eos: %r (ends a turn) instead of %r, which stays a stop token", turn_end, old_eos)
        tokenizer.eos_token = turn_end
    stops = [tokenizer.eos_token_id] + ([tokenizer.convert_tokens_to_ids(old_eos)] if old_eos and old_eos != turn_end else [])
    for c in (model.config, model.generation_config):
        c.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    grow_embeddings(model, len(tokenizer), trained)
    return specials + markup_tokens


@torch.no_grad()
def grow_embeddings(model: torch.nn.Module, vocab: int, trained: int) -> None:
    """At least `vocab` embedding rows (an untied lm_head too); rows [trained, vocab) become the mean of
    rows [0, trained). A checkpoint that already has spare rows (Qwen2.5 pads its vocabulary) keeps
    its size, but its spare rows for new tokens are set to the mean all the same."""
    if vocab > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    for w in [inp.weight] + ([out.weight] if out is not None and out.weight is not inp.weight else []):
        w[trained:vocab] = w[:trained].mean(0, keepdim=True)


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
