"""Generated IF data is seeded, covers every constraint, and its targets pass the reward's checks."""

from collections import Counter

from rewards.if_data import if_samples, main, preference_pairs, read_jsonl
from rewards.instruction import CHECKS, InstructionReward


def test_sft_targets_score_full_marks_and_cover_every_constraint():
    samples = if_samples(300, seed=0)
    assert all(r.score == 1.0 for r in InstructionReward(mode="all")(samples))
    assert set(Counter(c["type"] for s in samples for c in s["meta"]["constraints"])) == set(CHECKS)
    assert all(s["completion"].startswith("<think>") for s in samples)


def test_generation_is_seeded():
    assert if_samples(20, seed=7) == if_samples(20, seed=7) != if_samples(20, seed=8)


def test_pairs_prefer_the_answer_that_follows_the_instructions():
    pairs = preference_pairs(200, seed=0)
    reward = InstructionReward(mode="all")
    chosen = reward([{"completion": p["chosen"], "meta": {"constraints": p["constraints"]}} for p in pairs])
    rejected = reward([{"completion": p["rejected"], "meta": {"constraints": p["constraints"]}} for p in pairs])
    assert all(c.score == 1.0 and r.score == 0.0 for c, r in zip(chosen, rejected))
    assert len({p["violated"] for p in pairs}) >= 9


def test_cli_writes_jsonl_records(tmp_path):
    main([str(tmp_path / "if.jsonl"), "--n", "5"])
    records = read_jsonl(tmp_path / "if.jsonl")
    assert len(records) == 5 and {"id", "domain", "messages", "completion", "meta"} <= set(records[0])
