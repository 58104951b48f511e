"""A real checkpoint works as a base model: by hub id from an offline cache, with our special tokens
and chat template added, its own turn markup and eos kept, in the dtype asked for.

The checkpoints are tiny but real-shaped: a Llama with an untied lm_head and a Llama-3 tokenizer
(header markup, `<|eot_id|>`, a BOS, no pad), and a Qwen2 with a Qwen2.5-base-style tokenizer
(ChatML markup and a default system prompt, eos `<|endoftext|>`). Neither has our tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from experts import base_model
from experts.models import MARKUP_TOKENS, THINK_CLOSE, THINK_OPEN, load_model, load_tokenizer
from pipeline.context import MODEL_DIR, StageContext
from rollout.config import RolloutConfig
from rollout.worker import RolloutWorker

REPO = Path(__file__).resolve().parents[2]
TEXT = ["The sum of 12 and 30 is 42.", "Hello, how are you today?", "def add(a, b): return a + b"] * 30

# Meta's Llama-3 instruct template, as shipped (a BOS, header markup, trimmed content, <|eot_id|>).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5's shape: ChatML, and a default system turn when the chat has none.
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bpe(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def llama3_checkpoint(path: Path) -> Path:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(specials), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def qwen_base_checkpoint(path: Path) -> Path:
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=QWEN_TEMPLATE)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def adopt(src: Path, out: Path, **cfg) -> Path:
    """Run the base_model stage on `src`; returns the checkpoint it wrote."""
    base_model.run(base_model.Config(pretrained=str(src), **cfg), StageContext("t", "base", out))
    return out / MODEL_DIR


CHAT = [{"role": "user", "content": "Add 12 and 30."},
        {"role": "assistant", "content": "42", "reasoning_content": "12 + 30 = 42"},
        {"role": "tool", "content": "ok"}]


def test_a_llama3_checkpoint_gets_our_tokens_and_keeps_its_markup_and_eos(tmp_path):
    src = llama3_checkpoint(tmp_path / "llama")
    before, old = load_model(src), load_tokenizer(src)
    out = adopt(src, tmp_path / "run")
    model, tok = load_model(out), load_tokenizer(out)

    for t in MARKUP_TOKENS + [tok.pad_token]:  # each a single id, new, and decode keeps the markup
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] >= len(old), t
    assert tok.decode(tok(f"{THINK_OPEN}x{THINK_CLOSE}", add_special_tokens=False)["input_ids"],
                      skip_special_tokens=True) == f"{THINK_OPEN}x{THINK_CLOSE}"
    assert tok.eos_token == "<|eot_id|>" and tok.pad_token not in (None, tok.eos_token)

    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tok) and head.data_ptr() != emb.data_ptr()
    torch.testing.assert_close(emb[: len(old)], before.get_input_embeddings().weight)  # trained rows untouched
    torch.testing.assert_close(emb[len(old):], before.get_input_embeddings().weight.mean(0).expand(len(tok) - len(old), -1))
    torch.testing.assert_close(head[len(old):], before.get_output_embeddings().weight.mean(0).expand(len(tok) - len(old), -1))

    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nAdd 12 and 30.<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\n12 + 30 = 42\n</think>\n42<|eot_id|>"
                    "<|start_header_id|>tool<|end_header_id|>\n\n<|tool_result|>ok<|/tool_result|><|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False).endswith("<|end_header_id|>\n\n<think>\n</think>\n")
    # a plain chat renders exactly as the checkpoint's own template did
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(plain, tokenize=False) == old.apply_chat_template(plain, tokenize=False)


def test_an_agent_episodes_tool_turn_is_what_the_rerendered_chat_holds_in_the_checkpoints_markup(tmp_path):
    """Llama-3 writes nothing after <|eot_id|> (ChatML writes a newline): the tokens an episode appends after
    the model's turn must match the conversation rendered whole, or SFT and rollouts see different text."""
    from rollout.episodes import tool_turn_ids

    tok = load_tokenizer(adopt(llama3_checkpoint(tmp_path / "llama"), tmp_path / "run"))
    head = tok.apply_chat_template(CHAT[:2], tokenize=False)
    whole = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.decode(tool_turn_ids(tok, "ok", think=True)) == whole[len(head):]
    assert not whole[len(head):].startswith("\n")


def test_rollouts_on_an_adopted_checkpoint_force_the_think_close_and_stop_at_its_eos(tmp_path):
    out = adopt(llama3_checkpoint(tmp_path / "llama"), tmp_path / "run")
    tok = load_tokenizer(out)
    # Make the random model think forever unless forced out, and end its turn right after </think>\n.
    model = load_model(out)
    with torch.no_grad():
        bias = torch.full((len(tok),), -30.0)
        bias[tok.convert_tokens_to_ids(THINK_OPEN)] = 30.0
        model.get_output_embeddings().bias = torch.nn.Parameter(bias)
    forced = tok(THINK_CLOSE + "\n", add_special_tokens=False)["input_ids"]
    cfg = RolloutConfig(group_size=2, max_new_tokens=12, reasoning="think_high", think_budget=4, temperature=0)
    worker = RolloutWorker(str(out), cfg)
    worker.backend.model = model.eval()
    rollouts = worker.generate([{"id": 0, "domain": "math", "messages": [{"role": "user", "content": "Add 12 and 30."}]}])
    for r in rollouts:
        thought = r.response_ids[:4]
        assert thought == [tok.convert_tokens_to_ids(THINK_OPEN)] * 4  # the budget spent mid-thought...
        assert r.response_ids[4 : 4 + len(forced)] == forced  # ...so </think>\n is appended
        assert r.prompt_ids[: 1] == [tok.bos_token_id] and tok.decode(r.prompt_ids).endswith("assistant<|end_header_id|>\n\n")
    # and a model whose next token is its eos stops there, in one token
    with torch.no_grad():
        bias.fill_(-30.0)
        bias[tok.eos_token_id] = 30.0
    rollouts = worker.generate([{"id": 0, "domain": "math", "messages": [{"role": "user", "content": "Hi"}]}])
    assert all(r.response_ids == [tok.eos_token_id] and r.finished for r in rollouts)


def test_a_base_checkpoint_ends_turns_with_its_markup_and_keeps_its_old_eos_as_a_stop_token(tmp_path):
    src = qwen_base_checkpoint(tmp_path / "qwen")
    old = load_tokenizer(src)
    out = adopt(src, tmp_path / "run", dtype="bfloat16")
    tok, model = load_tokenizer(out), load_model(out)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == [tok.eos_token_id, old.eos_token_id]
    assert model.config.eos_token_id == tok.eos_token_id
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == len(old) + len(MARKUP_TOKENS)
    text = tok.apply_chat_template(CHAT[:2], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|im_start|>assistant\n<think>\n12 + 30 = 42\n</think>\n42<|im_end|>\n" in text
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]  # still loads and generates


def test_an_adopted_checkpoint_adopted_again_is_unchanged(tmp_path):
    once = adopt(llama3_checkpoint(tmp_path / "llama"), tmp_path / "a")
    twice = adopt(once, tmp_path / "b")
    assert load_tokenizer(once).get_vocab() == load_tokenizer(twice).get_vocab()
    assert load_tokenizer(once).chat_template == load_tokenizer(twice).chat_template


# Qwen3's shape: an empty think block on a final assistant turn; Gemma's: "model" for the assistant;
# DeepSeek-R1's: no role names at all (nothing to keep, so ChatML's turns are used).
QWEN3_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


@pytest.mark.parametrize("template, header", [(LLAMA3_TEMPLATE, "<|start_header_id|>assistant<|end_header_id|>\n\n"),
                                              (QWEN_TEMPLATE, "<|im_start|>assistant\n"),
                                              (QWEN3_TEMPLATE, "<|im_start|>assistant\n"),
                                              (GEMMA_TEMPLATE, "<start_of_turn>model\n"),
                                              (DEEPSEEK_TEMPLATE, None)])
def test_a_checkpoints_own_turn_markup_is_kept_where_our_template_can_write_it(template, header):
    from experts.models import chat_template, read_markup

    specials = ["<bos>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
                "<start_of_turn>", "<end_of_turn>", "<｜User｜>", "<｜Assistant｜>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(specials), bos_token="<bos>", eos_token="</s>",
                                  chat_template=template)
    markup = read_markup(tok)
    if header is None:
        assert markup is None
        return
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert tok.apply_chat_template(chat, tokenize=False, chat_template=chat_template(markup)) == \
        tok.apply_chat_template(chat, tokenize=False)
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                   chat_template=chat_template(markup)).endswith(header)


# ---- hub ids, resolved offline from a hub cache laid out as huggingface_hub lays it out

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(home: Path, repo: str, checkpoint: Path) -> None:
    """HF_HOME/hub/models--org--name/{blobs, snapshots/<commit>/ (links into blobs), refs/main}."""
    import hashlib

    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "snapshots" / COMMIT).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for f in checkpoint.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, root / "blobs" / blob)
        (root / "snapshots" / COMMIT / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)


def cli(*args, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


def test_a_hub_id_in_the_offline_cache_validates_and_runs(tmp_path):
    home = tmp_path / "hf"
    hub_cache(home, "tiny-org/llama3-tiny", llama3_checkpoint(tmp_path / "llama"))
    wf = tmp_path / "wf.yaml"
    wf.write_text("name: hub\nstages:\n  base: {kind: base_model, config: {pretrained: tiny-org/llama3-tiny@main}}\n")
    r = cli("validate", wf, home=home, cwd=tmp_path)
    assert r.returncode == 0 and "base" in r.stdout, r.stderr[-2000:]

    r = cli("run", wf, "--runs-dir", tmp_path / "runs", home=home, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    tok = load_tokenizer(tmp_path / "runs" / "hub" / "base" / MODEL_DIR)
    assert tok.eos_token == "<|eot_id|>" and len(tok(THINK_CLOSE, add_special_tokens=False)["input_ids"]) == 1


def test_a_hub_id_missing_from_the_offline_cache_is_one_line(tmp_path):
    home = tmp_path / "hf"
    wf = tmp_path / "wf.yaml"
    wf.write_text("name: hub\nstages:\n  base: {kind: base_model, config: {pretrained: no-org/nothing}}\n")
    r = cli("validate", wf, home=home, cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].endswith(f"stages.base.config.pretrained: 'no-org/nothing' is not a stage, a local checkpoint, "
                             f"or a hub id in the cache at {home / 'hub'} (HF_HUB_OFFLINE=1)")


@pytest.mark.parametrize("ref, parsed", [("Qwen/Qwen2.5-0.5B-Instruct", ("Qwen/Qwen2.5-0.5B-Instruct", None)),
                                         ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
                                         ("runs/x/model", None), ("/abs/dir", None), ("./ckpt", None),
                                         ("s3://bucket/ckpt", None), ("a--b/c", None), ("base", None)])
def test_what_reads_as_a_hub_id(ref, parsed):
    from pipeline.hub import parse_hub_id

    assert parse_hub_id(ref) == parsed


def test_hub_docstring_examples():
    import doctest

    import pipeline.hub

    result = doctest.testmod(pipeline.hub)
    assert result.attempted > 0 and result.failed == 0
