"""A domain's data: held-out prompts are never trained on, and bad records name their file and line."""

from __future__ import annotations

import json

import pytest

from experts.data import DataConfig, load_samples
from pipeline.config import UserError
from tests.conftest import ARITH


def prompts(samples):
    return {json.dumps(s["messages"]) for s in samples}


def test_heldout_prompts_never_appear_in_training():
    cfg = DataConfig(**{**ARITH, "size": 600, "heldout": 30})
    train, heldout = load_samples(cfg), load_samples(cfg, "heldout")
    assert len(heldout) == 30 and not prompts(train) & prompts(heldout)
    assert load_samples(cfg) == train  # fixed by the seed


def test_generator_source_makes_instruction_following_samples():
    cfg = DataConfig(domain="instruction", source="generator", task="rewards.if_data:if_samples", size=40, heldout=5)
    samples = load_samples(cfg)
    assert len(samples) == 35 and all(s["domain"] == "instruction" and s["meta"]["constraints"] for s in samples)


def test_generator_must_be_importable():
    with pytest.raises(ValueError, match="task 'no.such:thing': expected an importable `module:function`"):
        DataConfig(source="generator", task="no.such:thing")


def test_jsonl_record_errors_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n{not json\n")
    with pytest.raises(UserError, match=rf"^{f}:2: not valid JSON"):
        load_samples(DataConfig(source="jsonl", path=str(f), heldout=0))
    f.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(UserError, match=rf"^{f}:1: needs 'messages' or 'prompt'"):
        load_samples(DataConfig(source="jsonl", path=str(f), heldout=0))
