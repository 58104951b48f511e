"""Teacher LM heads, read straight from safetensors, with at most one resident at a time.

The cache holds each teacher's final-normed hidden states, so the only teacher weight training
needs is its LM head [vocab, hidden] (~0.5 GB for a 7B teacher in bf16, so 10+ of them do not fit
beside a student). The reader yields batches sorted by teacher, so `HeadStore` loads each head once
per round and frees it before reading the next.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

HEAD_KEYS = ("lm_head.weight", "model.embed_tokens.weight")  # the second when embeddings are tied


def read_head(checkpoint: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """The LM head [vocab, hidden] of an HF checkpoint, read without loading the rest of the model.

    Tiny and small models tie the head to the input embeddings and save only
    `model.embed_tokens.weight`; that is used when `lm_head.weight` is absent and config.json says
    the embeddings are tied.
    """
    checkpoint = Path(checkpoint)
    files = _key_to_file(checkpoint)
    key = next((k for k in HEAD_KEYS if k in files), None)
    if key is None:
        raise FileNotFoundError(f"{checkpoint}: no {' or '.join(HEAD_KEYS)} in its safetensors")
    if key != HEAD_KEYS[0]:
        config = json.loads((checkpoint / "config.json").read_text()) if (checkpoint / "config.json").exists() else {}
        if not config.get("tie_word_embeddings", True):
            raise FileNotFoundError(f"{checkpoint}: no lm_head.weight and tie_word_embeddings is false")
    with safe_open(str(checkpoint / files[key]), framework="pt", device="cpu") as f:
        return f.get_tensor(key).to(device=device, dtype=dtype)


def _key_to_file(checkpoint: Path) -> dict[str, str]:
    """Tensor name -> file name, for single-file and sharded (`*.index.json`) checkpoints."""
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = checkpoint / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{checkpoint}: no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {k: single.name for k in f.keys()}


class HeadStore:
    """`get(teacher)` returns that teacher's head, reading it only when the teacher changes.

    `loads` lists teacher ids in the order their heads were read (one entry per read), which the
    stage logs and the tests check.
    """

    def __init__(self, checkpoints: list[str | Path], dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.checkpoints, self.dtype, self.device = [Path(c) for c in checkpoints], dtype, device
        self.loads: list[int] = []
        self._teacher: int | None = None
        self._head: torch.Tensor | None = None

    def get(self, teacher: int) -> torch.Tensor:  # [vocab, hidden_t]
        if teacher != self._teacher:
            self.release()  # drop the old head first: two heads are never resident together
            self._head = read_head(self.checkpoints[teacher], self.dtype, self.device)
            self._teacher = teacher
            self.loads.append(teacher)
            log.debug("loaded LM head of teacher %d from %s", teacher, self.checkpoints[teacher])
        return self._head

    def release(self) -> None:
        self._head, self._teacher = None, None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
