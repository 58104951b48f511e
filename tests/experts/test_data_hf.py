"""A user's own data files and Hub datasets load through `source: hf`, their columns mapped onto our samples."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pandas as pd
import pytest

from experts.data import DataConfig, load_samples
from pipeline.config import UserError, load_workflow
from tests.conftest import REPO

# gsm8k's shape: a question, and an answer whose working ends in "#### <number>"
ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}"} for i in range(600, 606)]
GSM8K = dict(source="hf", columns={"prompt": "question", "answer": "answer"}, answer_after="####", heldout=0)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """datasets writes its Arrow cache here, not into ~/.cache, and never asks the Hub."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def write(path, rows):
    """`rows` written in the format `path`'s ending names."""
    frame = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


def by_prompt(samples):
    return {s["messages"][-1]["content"]: s["answer"] for s in samples}


@pytest.mark.parametrize("ending", [".json", ".jsonl", ".parquet", ".csv"])
def test_a_gsm8k_style_file_of_each_format_loads_with_its_columns_mapped(tmp_path, ending):
    f = write(tmp_path / f"gsm8k{ending}", ROWS)
    samples = load_samples(DataConfig(**GSM8K, path=str(f)))
    assert by_prompt(samples) == {f"What is {i} + {i}?": str(2 * i) for i in range(600, 606)}  # "1,200" -> "1200"
    assert all(s["messages"] == [{"role": "user", "content": s["messages"][0]["content"]}] for s in samples)


def test_a_glob_and_a_directory_of_files_read_the_split_named(tmp_path):
    write(tmp_path / "train-0.parquet", ROWS[:3])
    write(tmp_path / "train-1.parquet", ROWS[3:])
    assert len(load_samples(DataConfig(**GSM8K, files=str(tmp_path / "train-*.parquet")))) == 6

    d = tmp_path / "gsm8k"
    d.mkdir()
    write(d / "train.csv", ROWS[:4])
    write(d / "test.csv", ROWS[4:])
    test = load_samples(DataConfig(**GSM8K, path=str(d), split="test"))
    assert sorted(by_prompt(test).values()) == ["1208", "1210"]
    with pytest.raises(UserError, match=rf"""^{d}: cannot read split 'dev': Unknown split "dev". """
                                        r"""Should be one of \['train', 'test'\]"""):
        load_samples(DataConfig(**GSM8K, path=str(d), split="dev"))


def test_chat_messages_and_code_tests_come_through_from_parquet(tmp_path):
    rows = [{"conversation": [{"role": "user", "content": f"Write f{i}."}], "checks": [f"assert f{i}() == {i}"],
             "solution": f"def f{i}(): return {i}"} for i in range(3)]
    f = write(tmp_path / "code.parquet", rows)
    cfg = DataConfig(source="hf", path=str(f), domain="code", heldout=1,
                     columns={"messages": "conversation", "tests": "checks", "completion": "solution"})
    samples = load_samples(cfg, "all")
    assert {s["messages"][0]["content"]: (s["meta"]["tests"], s["completion"]) for s in samples} == {
        f"Write f{i}.": ([f"assert f{i}() == {i}"], f"def f{i}(): return {i}") for i in range(3)}
    assert len(load_samples(cfg)) == 2 and len(load_samples(cfg, "heldout")) == 1


def test_a_missing_column_names_the_column_the_file_and_what_it_has(tmp_path):
    f = write(tmp_path / "gsm8k.csv", ROWS)
    with pytest.raises(UserError, match=rf"^{f}: data.columns.prompt: no column 'problem'; "
                                        r"it has \['question', 'answer'\]$"):
        load_samples(DataConfig(source="hf", path=str(f), columns={"prompt": "problem"}))
    with pytest.raises(UserError, match=rf"^{f}: needs a 'messages' or 'prompt' column .* it has \['question', 'answer'\]$"):
        load_samples(DataConfig(source="hf", path=str(f)))
    j = write(tmp_path / "gsm8k.jsonl", ROWS)  # source: jsonl maps columns too, and names the line
    with pytest.raises(UserError, match=rf"^{j}:1: data.columns.prompt: no column 'problem'; it has \['answer', 'question'\]$"):
        load_samples(DataConfig(source="jsonl", path=str(j), columns={"prompt": "problem"}))
    bare = write(tmp_path / "bare.jsonl", [{"prompt": "p", "answer": "7"}])
    with pytest.raises(UserError, match=rf"^{bare}\[0\]: answer: no '####' in '7' \(data.answer_after\)$"):
        load_samples(DataConfig(source="hf", path=str(bare), answer_after="####", heldout=0))


def test_a_dataset_saved_to_disk_still_loads_with_its_split(tmp_path):
    rows = [{"prompt": r["question"], "answer": r["answer"]} for r in ROWS]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(tmp_path / "two")
    assert len(load_samples(DataConfig(source="hf", path=str(tmp_path / "one"), heldout=0))) == 6
    test = load_samples(DataConfig(source="hf", path=str(tmp_path / "two"), split="test", answer_after="####", heldout=0))
    assert sorted(by_prompt(test).values()) == ["1208", "1210"]


def test_a_hub_dataset_missing_from_the_cache_offline_is_one_line(tmp_path):
    cfg = DataConfig(source="hf", dataset="openai/gsm8k", subset="main", **{k: v for k, v in GSM8K.items() if k != "source"})
    with pytest.raises(UserError, match=rf"^data.dataset: 'openai/gsm8k' \(subset 'main'\) is not in the datasets "
                                        rf"cache \({tmp_path / 'hf_cache'}\) and HF_HUB_OFFLINE is set: "):
        load_samples(cfg)


WORKFLOW = """
name: t
stages:
  base: {{kind: base_model, config: {{vocab_size: 300}}}}
  sft: {{kind: sft, needs: [base], config: {{model: base, steps: 5, data: [{data}]}}}}
"""


@pytest.mark.parametrize("data, error", [
    ("{source: hf, path: F, hf_split: test}", "stages.sft.config.data.0.hf_split: Value error, renamed: now `split`"),
    ("{source: hf, path: F, dataset: openai/gsm8k}", "source 'hf' needs one of `path` (a local file or dir), "
                                                     "`files` (a glob) or `dataset` (a Hub name); got path, dataset"),
    ("{source: hf, files: 'data/*'}", "files 'data/*': end the glob with the format, one of .json, .jsonl, .parquet"),
    ("{source: hf, path: F, subset: main}", "subset names a config of a Hub `dataset`; local files have none"),
    ("{source: hf, path: F, columns: {question: prompt}}", "stages.sft.config.data.0.columns.question.[key]: "
                                                           "Input should be 'messages', 'prompt',"),
    ("{source: hf, path: nowhere.csv}", "stages.sft.config.data.0.path: 'nowhere.csv' does not exist"),
])
def test_workflow_mistakes_in_hf_data_are_one_line_at_validate(tmp_path, data, error):
    f = write(tmp_path / "gsm8k.txt", ROWS[:1]) if "F," not in data else write(tmp_path / "gsm8k.csv", ROWS)
    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW.format(data=data.replace("F", str(f))))
    with pytest.raises(UserError) as e:
        load_workflow(wf)
    assert str(e.value).startswith(f"{wf}: ") and error in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_workflow_with_hf_data_validates_without_the_hub(tmp_path):
    f = write(tmp_path / "gsm8k.parquet", ROWS)
    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW.format(data=f"{{source: hf, path: {f}, columns: {{prompt: question}}, answer_after: '####'}}, "
                                       f"{{source: hf, dataset: openai/gsm8k, subset: main, split: test, domain: gsm8k}}"))
    data = load_workflow(wf).stages["sft"].config.data
    assert [(d.path, d.dataset, d.split) for d in data] == [(str(f), None, "train"), (None, "openai/gsm8k", "test")]


def test_pipeline_validate_names_a_data_file_it_cannot_read(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not data\n")
    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW.format(data=f"{{source: hf, path: {notes}}}"))
    r = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(wf)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.strip().startswith(
        f"error: {wf}: stages.sft.config.data.0: Value error, path '{notes}': source 'hf' reads "
        f".json, .jsonl, .parquet, .csv files, a directory of them or a saved `datasets` directory"), r.stderr
