"""Datasets by domain: a domain is a name, a source of samples and (in GRPO) a reward.

Every source yields the same sample dict, which rewards, SFT, GRPO and distillation all read:

    {"id": str, "domain": str, "messages": [prompt chat messages], "answer": gold or None,
     "completion": SFT target text or None, "meta": {...}}

Sources: `reasoning_gym` (procedurally generated tasks shipped in that PyPI package), `jsonl`
(one sample per line; `prompt` may stand in for `messages`), `hf` (a local `datasets` dataset),
`generator` (any `module:function(n, seed, **task_args)` returning sample dicts, e.g.
`rewards.if_data:if_samples` for instruction following).
The held-out split is taken after removing duplicate prompts, so no held-out prompt is trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import PathRef, StageConfig, UserError

Split = Literal["train", "heldout", "all"]


class DataConfig(StageConfig):
    """Where a domain's samples come from, and how many are held out for evaluation."""

    domain: str = Field("math", description="Domain name; routes samples to rewards and teachers.")
    source: Literal["reasoning_gym", "jsonl", "hf", "generator"] = Field(
        "reasoning_gym",
        description="reasoning_gym: generate `size` tasks; jsonl: read `path`; hf: load `path`; generator: call `task`.",
    )
    task: str = Field(
        "basic_arithmetic", description="reasoning-gym dataset name, or `module:function` for source: generator."
    )
    task_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the task or generator.")
    path: PathRef | None = Field(None, description="JSONL file (source: jsonl) or saved `datasets` dir (source: hf).")
    hf_split: str = Field("train", description="Split to read from an hf dataset.")
    size: int = Field(2000, ge=1, description="Samples to generate (reasoning_gym) or to keep at most.")
    heldout: int = Field(200, ge=0, description="Samples held out for evaluation, taken after de-duplication.")
    seed: int = Field(0, description="Seed for generation and for the train/held-out split.")
    system: str | None = Field(None, description="System prompt added to every sample.")
    think: bool = Field(False, description="SFT targets write the answer's working inside the think block.")

    @model_validator(mode="after")
    def _needs_path(self):
        if self.source in ("jsonl", "hf") and not self.path:
            raise ValueError(f"source {self.source!r} needs `path`")
        if self.source == "generator":
            _generator(self.task)  # fails at load time, naming the function, not mid-run
        return self


def load_samples(cfg: DataConfig, split: Split = "train") -> list[dict]:
    """The samples of one split, in a fixed order given by `cfg.seed`."""
    samples = _dedupe(_read(cfg))
    random.Random(cfg.seed).shuffle(samples)
    if cfg.heldout >= len(samples) and split != "all":
        raise UserError(f"data.heldout: {cfg.heldout} held out leaves no training samples from {len(samples)}")
    if split == "heldout":
        return samples[: cfg.heldout]
    if split == "train":
        return samples[cfg.heldout :]
    return samples


def sample_texts(samples: list[dict]) -> list[str]:
    """Prompt and completion text of samples, to train a tokenizer on."""
    out = []
    for s in samples:
        out.extend(m["content"] for m in s["messages"])
        out.append(s.get("completion") or "")
    return out


def _read(cfg: DataConfig) -> list[dict]:
    if cfg.source == "reasoning_gym":
        return _reasoning_gym(cfg)
    if cfg.source == "generator":
        rows = _generator(cfg.task)(n=cfg.size, seed=cfg.seed, **cfg.task_args)
        return [_normalise(r, cfg, where=cfg.task) for r in rows]
    if cfg.source == "jsonl":
        rows = []
        with open(cfg.path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{cfg.path}:{lineno}: not valid JSON: {e.msg}") from None
                rows.append(_normalise(row, cfg, where=f"{cfg.path}:{lineno}"))
        return rows[: cfg.size]
    import datasets

    ds = datasets.load_from_disk(cfg.path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[cfg.hf_split]
    return [_normalise(dict(r), cfg, where=f"{cfg.path}[{i}]") for i, r in enumerate(ds.select(range(min(cfg.size, len(ds)))))]


def _generator(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"task {spec!r}: expected an importable `module:function`") from None
    return fn


def _reasoning_gym(cfg: DataConfig) -> list[dict]:
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(cfg.task, size=cfg.size, seed=cfg.seed, **cfg.task_args)
    except Exception as e:  # unknown task or bad argument: the library's own message is the useful part
        raise UserError(f"data.task: reasoning-gym cannot make {cfg.task!r} with {cfg.task_args}: {e}") from None
    rows = []
    for item in ds:
        answer = str(item["answer"])
        working = item["metadata"].get("expression") if cfg.think else None
        think = f"<think>\n{working} = {answer}\n</think>\n" if working else "<think>\n</think>\n"
        rows.append(
            _normalise(
                {"prompt": item["question"], "answer": answer, "completion": think + f"\\boxed{{{answer}}}",
                 "meta": {"task": cfg.task}},
                cfg,
                where=f"reasoning_gym:{cfg.task}",
            )
        )
    return rows


def _normalise(row: dict, cfg: DataConfig, where: str) -> dict:
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise UserError(f"{where}: messages: expected a list of {{role, content}} mappings")
    elif "prompt" in row:
        messages = [{"role": "user", "content": str(row["prompt"])}]
    else:
        raise UserError(f"{where}: needs 'messages' or 'prompt', has {sorted(row)}")
    if cfg.system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system}] + messages
    key = json.dumps(messages, sort_keys=True)
    return {
        "id": str(row.get("id") or hashlib.sha1(key.encode()).hexdigest()[:12]),
        "domain": row.get("domain") or cfg.domain,
        "messages": messages,
        "answer": None if row.get("answer") is None else str(row["answer"]),
        "completion": row.get("completion"),
        "meta": row.get("meta") or {},
    }


def _dedupe(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        key = json.dumps(r["messages"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    from pipeline.context import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in rows))
