"""A domain's data: held-out prompts are never trained on, and bad records name their file and line."""

from __future__ import annotations

import json
import re

import pytest

from experts.data import DataConfig, fresh_samples, load_samples, prompt_key
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


def test_fresh_samples_are_new_problems_and_never_held_out():
    for cfg in (DataConfig(**{**ARITH, "size": 200, "heldout": 40}),
                DataConfig(source="generator", task="experts.tasks:echo_samples", size=200, heldout=40)):
        heldout = {prompt_key(s) for s in load_samples(cfg, "heldout")}
        fresh = fresh_samples(cfg, 50, seed=123_456, exclude=heldout)
        assert len(fresh) == len({prompt_key(s) for s in fresh}) == 50 and not {prompt_key(s) for s in fresh} & heldout
        assert fresh == fresh_samples(cfg, 50, seed=123_456, exclude=heldout)  # fixed by the seed
        assert fresh != fresh_samples(cfg, 50, seed=987_654, exclude=heldout)


def test_fresh_samples_need_a_generator_and_enough_prompts_outside_the_heldout(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "hi"}\n')
    with pytest.raises(ValueError, match="source 'jsonl' cannot make new samples"):
        fresh_samples(DataConfig(source="jsonl", path=str(f)), 1, seed=0)
    # one digit: 9 distinct prompts; with 3 excluded, 6 can be made and a 7th cannot
    one = DataConfig(source="generator", task="experts.tasks:echo_samples", task_args={"digits": 1}, heldout=3)
    held = {prompt_key(s) for s in load_samples(one, "heldout")}
    assert len(fresh_samples(one, 6, seed=0, exclude=held)) == 6
    with pytest.raises(UserError, match=r"echo_samples made only 6 new prompts \(not held out\) of 448"):
        fresh_samples(one, 7, seed=0, exclude=held)


def test_docstring_examples():
    import doctest

    import experts.data

    assert doctest.testmod(experts.data).failed == 0


def test_column_working_adds_one_digit_facts_up_to_the_answer():
    cfg = DataConfig(domain="math", source="reasoning_gym", task="basic_arithmetic", size=300, heldout=0, think=True,
                     working="columns", task_args={"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2,
                                                   "operators": ["+"], "allow_negation": False,
                                                   "allow_parentheses": False})
    for s in load_samples(cfg, need_completion=True):
        think, boxed = s["completion"].split("</think>")
        lines = think.replace("<think>", "").strip().splitlines()
        digits = []
        for line in lines:
            terms, total = line.split(" = ")
            assert all(len(t) == 1 for t in terms.split(" + ")) and sum(map(int, terms.split(" + "))) == int(total)
            digits.append(total)
        assert boxed.strip() == f"\\boxed{{{digits[-1] + ''.join(d[-1] for d in reversed(digits[:-1]))}}}"
        assert int(s["answer"]) == sum(map(int, s["messages"][-1]["content"].removeprefix("Calculate ")
                                           .rstrip(".").split(" + ")))


def test_generator_must_be_importable():
    with pytest.raises(ValueError, match="task 'no.such:thing': expected an importable `module:function`"):
        DataConfig(source="generator", task="no.such:thing")


def test_generator_arguments_it_does_not_take_are_one_line():
    bad = DataConfig(domain="agent", source="generator", task="experts.tasks:agent_samples", size=4, heldout=1,
                     task_args={"names": 99})
    with pytest.raises(UserError, match=r"^data.task_args: experts.tasks:agent_samples cannot make samples with "
                                        r"\{'names': 99\}: agent_samples: names=99 is not in 1..32$"):
        load_samples(bad, "train")
    with pytest.raises(UserError, match=r"unexpected keyword argument 'nmaes'"):
        load_samples(bad.model_copy(update={"task_args": {"nmaes": 8}}), "train")


def test_agent_file_names_are_copied_from_the_prompt_not_picked_from_four():
    from experts.tasks import agent_samples

    counts = [s for s in agent_samples(600, names=32) if s["meta"]["task"]["prompt"].startswith("Count")]
    names = [s["meta"]["task"]["prompt"].split()[4] for s in counts]
    assert len({re.fullmatch(r"([a-z]+)[0-9]+\.txt", n).group(1) for n in names}) == 32
    for s, name in zip(counts, names):  # the scripted call counts the very file the prompt names
        assert f"wc -l < {name} > answer.txt" in s["completion"]
    assert agent_samples(50) == agent_samples(50, names=4)  # the default is the four-word task earlier runs used


def test_jsonl_record_errors_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n{not json\n")
    with pytest.raises(UserError, match=rf"^{f}:2: not valid JSON"):
        load_samples(DataConfig(source="jsonl", path=str(f), heldout=0))
    f.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(UserError, match=rf"^{f}:1: needs 'messages' or 'prompt'"):
        load_samples(DataConfig(source="jsonl", path=str(f), heldout=0))


GOOD_ROW = json.dumps({"prompt": "1+1", "completion": "2"})


@pytest.mark.parametrize("line, expected", [
    (b"5", "expected a JSON object with 'messages' or 'prompt', got a number"),
    (b"null", "expected a JSON object with 'messages' or 'prompt', got null"),
    (b'["a"]', "expected a JSON object with 'messages' or 'prompt', got a list"),
    (b'{"prompt": "caf\xe9"}', "not valid UTF-8 (byte 16 of the line)"),
    (b'{"prompt": null}', "prompt: expected a string, got null"),
    (b'{"prompt": "hi", "completion": 5}', "completion: expected a string, got a number"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages: expected a non-empty list"),
    (b'{"messages": []}', "messages: expected a non-empty list"),
    (b'{"prompt": "hi", "meta": "x"}', "meta: expected an object, got a string"),
    (b'{"prompt": "hi", "domain": 3}', "domain: expected a string, got a number"),
    (b"[" * 100000 + b"]" * 100000, "JSON nested too deeply"),
])
def test_bad_jsonl_row_is_one_line_naming_file_and_line(tmp_path, line, expected):
    f = tmp_path / "d.jsonl"
    f.write_bytes(GOOD_ROW.encode() + b"\n" + line + b"\n")
    with pytest.raises(UserError) as e:
        load_samples(DataConfig(source="jsonl", path=str(f), heldout=0))
    assert str(e.value) == f"{f}:2: {expected}" or str(e.value).startswith(f"{f}:2: {expected}"), str(e.value)


def test_sft_samples_without_a_completion_are_an_error_not_skipped(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(GOOD_ROW + "\n" + json.dumps({"prompt": "2+2"}) + "\n")
    cfg = DataConfig(source="jsonl", path=str(f), heldout=0)
    assert len(load_samples(cfg)) == 2  # prompts alone are fine for GRPO and eval
    with pytest.raises(UserError, match=rf"^{f}:2: completion: missing; every SFT sample needs the target text$"):
        load_samples(cfg, need_completion=True)


def test_data_path_of_the_wrong_kind_fails_at_validate(tmp_path):
    (tmp_path / "f.jsonl").write_text(GOOD_ROW + "\n")
    with pytest.raises(ValueError, match="is a directory; source 'jsonl' reads a file"):
        DataConfig(source="jsonl", path=str(tmp_path))
    (tmp_path / "f.txt").write_text("notes\n")
    with pytest.raises(ValueError, match=r"f.txt': source 'hf' reads .json, .jsonl, .parquet, .csv files, a directory"):
        DataConfig(source="hf", path=str(tmp_path / "f.txt"))


def test_a_directory_that_is_not_a_dataset_is_one_line(tmp_path):
    with pytest.raises(UserError, match=rf"^{tmp_path}: neither a saved `datasets` dataset .* nor a directory of "):
        load_samples(DataConfig(source="hf", path=str(tmp_path), heldout=0))


@pytest.mark.parametrize("field, value", [("size", 10**12), ("heldout", 10**12), ("seed", -1)])
def test_data_sizes_are_bounded(field, value):
    with pytest.raises(ValueError, match=field):
        DataConfig(**{field: value})
