"""A toy world of 12 domains, each with a tiny teacher that answers in its own word.

Teacher k is the shared base model after a few SFT steps that make it reply "<word_k> <word_k> ..."
to prompts of domain k, so the direction a student must move in is unmistakable and cheap to train.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from experts.data import DataConfig
from experts.models import build_tiny_model, save_checkpoint, train_tokenizer

DOMAINS = [f"d{i:02d}" for i in range(12)]
WORDS = ["apple", "berry", "cider", "dates", "elder", "figgy", "grape", "honey", "icing", "jelly", "kiwis", "lemon"]
TINY = dict(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
STUDENT = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
PER_DOMAIN, HELDOUT = 20, 4
WARMUP_STEPS = 24  # enough that the student answers in the teachers' format (see the student below)


@dataclass
class ToyWorld:
    root: Path
    base: Path  # the teachers' starting point
    student: Path  # the student's starting point: larger than the teachers, same tokenizer
    teachers: list[Path]  # teacher k answers domain DOMAINS[k]
    data: list[DataConfig]  # one jsonl source per domain, HELDOUT prompts held out

    def teacher_entries(self, k=None):
        k = len(self.teachers) if k is None else k
        return [{"model": str(p), "domains": [d], "name": f"t_{d}"} for p, d in zip(self.teachers[:k], DOMAINS)]


def _rows(k):
    """Prompts of domain k name its word, so even a one-layer student can tell the domains apart."""
    domain, word = DOMAINS[k], WORDS[k]
    return [{"id": f"{domain}-{i}", "domain": domain, "prompt": f"{word} {word} {word} task {i}: answer please"}
            for i in range(PER_DOMAIN)]


def _sft(model, tok, rows, words, steps=60, lr=1e-2):
    """A few SFT steps on response tokens only: prompt -> 'wordwordword<|im_end|>'."""
    seqs, lens = [], []
    for r, word in zip(rows, words):
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        p = tok(text, add_special_tokens=False)["input_ids"]
        a = tok(word * 3 + "<|im_end|>", add_special_tokens=False)["input_ids"]
        seqs.append(p + a)
        lens.append(len(p))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full_like(ids, -100)
    for j, (s, p) in enumerate(zip(seqs, lens)):
        ids[j, : len(s)] = torch.tensor(s)
        labels[j, p : len(s)] = torch.tensor(s[p:])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models on 2 shared cores run ~10x faster on one thread than with two threads contending."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> ToyWorld:
    root = tmp_path_factory.mktemp("toy_world")
    # The answers are in the tokenizer's data too, so each word is one token (trained on prompts
    # alone, "apple" split into "ap"+"ple" and d00's answer became a six-token alternation).
    texts = [r["prompt"] for k in range(len(DOMAINS)) for r in _rows(k)] + [" ".join(WORDS)] * 20
    texts += [w * 3 for w in WORDS] * 20
    tok = train_tokenizer(texts, vocab_size=320)
    for w in WORDS:
        assert len(tok(w * 3, add_special_tokens=False)["input_ids"]) == 3, f"{w!r} is not one token"
    base = build_tiny_model(tok, seed=0, **TINY)
    save_checkpoint(base, tok, root / "base")
    data, teachers = [], []
    for k, (domain, word) in enumerate(zip(DOMAINS, WORDS)):
        rows = _rows(k)
        path = root / f"{domain}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data.append(DataConfig(domain=domain, source="jsonl", path=str(path), size=PER_DOMAIN, heldout=HELDOUT))
        teacher = build_tiny_model(tok, seed=0, **TINY)
        final = _sft(teacher, tok, rows, [word] * len(rows))
        assert final < 1.5, f"toy teacher {domain} did not learn its word (loss {final:.2f})"
        teachers.append(save_checkpoint(teacher, tok, root / f"teacher_{domain}"))
    # The student: a larger model after a short SFT warm-up on every domain, as a real student is a
    # pretrained generalist. From a random init, reverse KL (mode-seeking) lets a student settle on
    # tokens its teacher gives almost no mass (end of turn), where the gradient vanishes. With 16
    # warm-up steps (before KL ~8 nats/token) OPD was at the mercy of its sampling seed; with 24
    # every seed tried cut each domain's KL 100-fold (tests/distill/test_opd.py).
    student = build_tiny_model(tok, seed=1, **STUDENT)
    mixed = [(r, w) for k, w in enumerate(WORDS) for r in _rows(k)[:3]]
    _sft(student, tok, [r for r, _ in mixed], [w for _, w in mixed], steps=WARMUP_STEPS)
    save_checkpoint(student, tok, root / "student")
    return ToyWorld(root, root / "base", root / "student", teachers, data)
