"""Datasets by domain: a domain is a name, a source of samples and (in GRPO) a reward.

Every source yields the same sample dict, which rewards, SFT, GRPO and distillation all read:

    {"id": str, "domain": str, "messages": [prompt chat messages], "answer": gold or None,
     "completion": SFT target text or None, "meta": {...}}

Sources: `reasoning_gym` (procedurally generated tasks shipped in that PyPI package), `jsonl`
(one sample per line; `prompt` may stand in for `messages`), `hf` (through `datasets.load_dataset`:
a local .json / .jsonl / .parquet / .csv file, a glob or a directory of them, a saved `datasets`
directory, or a Hub dataset name read through the datasets cache), `generator` (any
`module:function(n, seed, **task_args)` returning sample dicts, e.g. `rewards.if_data:if_samples`
for instruction following). `columns` maps a file's or dataset's own column names onto ours
(`columns: {prompt: question}`), and `answer_after: "####"` keeps a gsm8k-style answer's final number.
The held-out split is taken after removing duplicate prompts, so no held-out prompt is trained on.
Generating sources (`GENERATING`) can also make new problems on demand (`fresh_samples`, GRPO's
`fresh_prompts`), never one whose prompt is held out.
A malformed record (not an object, not UTF-8, a field of the wrong type) is a `UserError` naming
its file and line; nothing is skipped silently.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from learner.batching import mixed_plan
from pipeline.config import PathRef, StageConfig, UserError

Split = Literal["train", "heldout", "all"]
MAX_SAMPLES = 10_000_000
GENERATING = ("reasoning_gym", "generator")  # sources that make new samples from any seed
# source: hf reads these file formats: the file ending -> the `datasets` builder that reads it
FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SampleField = Literal["messages", "prompt", "answer", "completion", "tests", "id", "domain"]


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
    path: PathRef | None = Field(None, description="JSONL file (source: jsonl); for source: hf a .json, .jsonl, "
                                                    ".parquet or .csv file, a directory of them, or a saved `datasets` dir.")
    files: str | None = Field(None, description="source: hf: a glob of local data files of one format, "
                                                "e.g. `data/train-*.parquet`.")
    dataset: str | None = Field(None, description="source: hf: a Hugging Face Hub dataset name, e.g. `openai/gsm8k`, "
                                                  "read through the datasets cache (HF_HUB_OFFLINE=1: the cache only).")
    subset: str | None = Field(None, description="source: hf: the Hub dataset's config name, e.g. `main` for openai/gsm8k.")
    split: str = Field("train", description="source: hf: the dataset's own split to read; `heldout` samples are then "
                                            "taken out of it.")
    hf_split: None = Field(None, exclude=True, description="Renamed: now `split` (setting it is an error saying so).")
    columns: dict[SampleField, str] = Field(
        default_factory=dict, description="source: jsonl or hf: our sample field -> the data's own column, e.g. "
                                          "{prompt: question, answer: answer}; `tests` lands in meta.tests.")
    answer_after: str | None = Field(None, description="Keep the answer's text after the last occurrence of this "
                                                       "marker, e.g. '####' for gsm8k (a number loses its commas).")
    size: int = Field(2000, ge=1, le=MAX_SAMPLES, description="Samples to generate (reasoning_gym) or to keep at most "
                                                               "(at most 10,000,000).")
    heldout: int = Field(200, ge=0, le=MAX_SAMPLES, description="Samples held out for evaluation, taken after de-duplication.")
    seed: int = Field(0, ge=0, lt=1 << 32, description="Seed for generation and for the train/held-out split.")
    system: str | None = Field(None, description="System prompt added to every sample.")
    think: bool = Field(False, description="SFT targets write the answer's working inside the think block.")
    working: Literal["chain", "columns"] = Field(
        "chain",
        description="think: how a reasoning-gym chain of + and - is worked. chain: one operation per line; columns: "
        "a sum of non-negative numbers digit by digit from the ones column, with carries, so every line is a "
        "one-digit fact (other expressions fall back to chain).",
    )

    @field_validator("hf_split", mode="before")
    @classmethod
    def _renamed(cls, value):
        raise ValueError("renamed: now `split`")

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "hf":
            _check_hf(self)
        elif self.files or self.dataset or self.subset:
            raise ValueError(f"files, dataset and subset are for source 'hf', not {self.source!r}")
        if self.source == "jsonl" and not self.path:
            raise ValueError("source 'jsonl' needs `path`")
        if self.source == "jsonl" and Path(self.path).is_dir():
            raise ValueError(f"path {self.path!r} is a directory; source 'jsonl' reads a file")
        if (self.columns or self.answer_after) and self.source in GENERATING:
            raise ValueError(f"columns and answer_after are for source 'jsonl' or 'hf', not {self.source!r}")
        if {"messages", "prompt"} <= set(self.columns):
            raise ValueError("columns: map `messages` or `prompt`, not both")
        if self.source == "generator":
            _generator(self.task)  # fails at load time, naming the function, not mid-run
        return self


def _check_hf(cfg: DataConfig) -> None:
    """source: hf reads exactly one of path, files, dataset; a local file or glob names a format we read."""
    given = [f for f in ("path", "files", "dataset") if getattr(cfg, f)]
    if len(given) != 1:
        got = f"got {', '.join(given)}" if given else "got none"
        raise ValueError(f"source 'hf' needs one of `path` (a local file or dir), `files` (a glob) or "
                         f"`dataset` (a Hub name); {got}")
    if cfg.subset and not cfg.dataset:
        raise ValueError("subset names a config of a Hub `dataset`; local files have none")
    if cfg.path and Path(cfg.path).is_file() and Path(cfg.path).suffix not in FORMATS:
        raise ValueError(f"path {cfg.path!r}: source 'hf' reads {_formats()} files, a directory of them "
                         f"or a saved `datasets` directory")
    if cfg.files and Path(cfg.files).suffix not in FORMATS:
        raise ValueError(f"files {cfg.files!r}: end the glob with the format, one of {_formats()} "
                         f"(e.g. data/*.parquet)")


def _formats() -> str:
    return ", ".join(FORMATS)


def load_samples(cfg: DataConfig, split: Split = "train", need_completion: bool = False) -> list[dict]:
    """The samples of one split, in a fixed order given by `cfg.seed`.

    need_completion: every sample must have a `completion` (SFT's target); one without is an error
    naming its record, not a sample silently dropped.
    """
    samples = _dedupe(_read(cfg, need_completion))
    random.Random(cfg.seed).shuffle(samples)
    if cfg.heldout >= len(samples) and split != "all":
        raise UserError(f"data.heldout: {cfg.heldout} held out leaves no training samples from {len(samples)}")
    if split == "heldout":
        return samples[: cfg.heldout]
    if split == "train":
        return samples[cfg.heldout :]
    return samples


def fresh_samples(cfg: DataConfig, n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """`n` distinct samples from a generating source made with `seed` (not `cfg.seed`), none whose
    `prompt_key` is in `exclude` (pass the held-out split's). Fixed by (cfg, n, seed, exclude).

    The generator is asked for more until n remain (at most 64 x n), else a `UserError`: a task whose
    distinct prompts are nearly all held out cannot make new ones. Pick seeds far apart (hash them):
    reasoning-gym seeds its item i with seed + i, so seeds s and s + 1 share all but one item.

    >>> cfg = DataConfig(domain="math", source="generator", task="experts.tasks:echo_samples", size=50, heldout=10)
    >>> held = {prompt_key(s) for s in load_samples(cfg, "heldout")}
    >>> new = fresh_samples(cfg, 2, seed=7, exclude=held)
    >>> [s["messages"][-1]["content"] for s in new], any(prompt_key(s) in held for s in new)
    (['Repeat the digits 6 3 7.', 'Repeat the digits 1 2 9.'], False)
    """
    if cfg.source not in GENERATING:
        raise ValueError(f"source {cfg.source!r} cannot make new samples; only {' or '.join(GENERATING)}")
    size = n
    while True:
        rows = [r for r in _dedupe(_read(cfg.model_copy(update={"size": size, "seed": seed})))
                if prompt_key(r) not in exclude]
        if len(rows) >= n:
            return rows[:n]
        if size >= 64 * n:
            raise UserError(f"data.task: {cfg.task} made only {len(rows)} new prompts (not held out) of "
                            f"{size} asked for with seed {seed}; {n} were needed")
        size *= 2


def prompt_key(sample: dict) -> str:
    """What makes two samples the same prompt: their messages (de-duplication and held-out checks use it)."""
    return json.dumps(sample["messages"], sort_keys=True)


def check_mix(mix: dict[str, float], data: list[DataConfig]) -> None:
    """A stage's `mix` names each domain of its data once, with a share above 0 (ValueError otherwise)."""
    domains = {d.domain for d in data}
    if mix and set(mix) != domains:
        raise ValueError(f"mix names {sorted(mix)}; give a share for each domain of data: {sorted(domains)}")
    if not all(v > 0 for v in mix.values()):
        raise ValueError(f"mix: every share must be > 0, got {mix}")


def domain_plan(mix: dict[str, float], samples: list[dict], per_step: int, steps: int, seed: int) -> list[list[int]]:
    """Sample indices for every step, each domain of `mix` taking its share (`learner.batching.mixed_plan`);
    a domain with no samples behind its share is a one-line error naming it (a record's own `domain`
    wins over its source's `data.domain`)."""
    groups = [[i for i, s in enumerate(samples) if s["domain"] == d] for d in mix]
    for d, g in zip(mix, groups):
        if not g:
            raise UserError(f"mix: domain {d!r} has no training samples (their domains: "
                            f"{sorted({s['domain'] for s in samples})}; a record's own `domain` wins over data.domain)")
    return mixed_plan(groups, list(mix.values()), per_step, steps, seed)


def sample_texts(samples: list[dict]) -> list[str]:
    """Prompt and completion text of samples, to train a tokenizer on."""
    out = []
    for s in samples:
        out.extend(m["content"] for m in s["messages"])
        out.append(s.get("completion") or "")
    return out


def _read(cfg: DataConfig, need_completion: bool = False) -> list[dict]:
    if cfg.source == "reasoning_gym":
        return _reasoning_gym(cfg)
    if cfg.source == "generator":
        try:
            rows = _generator(cfg.task)(n=cfg.size, seed=cfg.seed, **cfg.task_args)
        except (TypeError, ValueError) as e:  # a task_args name or value the generator does not take
            raise UserError(f"data.task_args: {cfg.task} cannot make samples with {cfg.task_args}: {e}") from None
        return [_normalise(r, cfg, f"{cfg.task}[{i}]", need_completion) for i, r in enumerate(rows)]
    if cfg.source == "jsonl":
        return _read_jsonl(cfg, need_completion)
    ds, where = _load_hf(cfg)
    _check_columns(cfg, list(ds.column_names), where)
    return [_normalise(_mapped(dict(r), cfg, f"{where}[{i}]"), cfg, f"{where}[{i}]", need_completion)
            for i, r in enumerate(ds.select(range(min(cfg.size, len(ds)))))]


def _load_hf(cfg: DataConfig):
    """The `datasets.Dataset` of `cfg.split` behind source: hf, and the name errors give its rows."""
    import datasets

    if cfg.dataset:
        return _load_hub(cfg), cfg.dataset + (f"[{cfg.subset}]" if cfg.subset else "")
    if cfg.files:
        files = sorted(glob.glob(cfg.files, recursive=True))
        if not files:
            raise UserError(f"data.files: {cfg.files!r} matches no file")
        args, where = (FORMATS[Path(cfg.files).suffix],), cfg.files
        kwargs = {"data_files": files}
    else:
        p, where = Path(cfg.path), cfg.path
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            return _load_saved(cfg), where
        if p.is_dir() and not any(f.suffix in FORMATS for f in p.rglob("*") if f.is_file()):
            raise UserError(f"{where}: neither a saved `datasets` dataset (no dataset_info.json or "
                            f"dataset_dict.json) nor a directory of {_formats()} files")
        args, kwargs = ((str(p),), {}) if p.is_dir() else ((FORMATS.get(p.suffix, "json"),), {"data_files": str(p)})
    try:
        return datasets.load_dataset(*args, split=cfg.split, **kwargs), where
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        # an unknown split (the message lists the known ones), or a file it cannot parse (the cause says where)
        raise UserError(f"{where}: cannot read split {cfg.split!r}: {_first_line(e.__cause__ or e)}") from None


def _load_saved(cfg: DataConfig):
    import datasets

    try:
        ds = datasets.load_from_disk(cfg.path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.split]
    except KeyError:
        raise UserError(f"{cfg.path}: no split {cfg.split!r} (data.split)") from None
    except (OSError, ValueError) as e:  # a damaged saved dataset
        raise UserError(f"{cfg.path}: cannot load a saved `datasets` dataset: {_first_line(e)}") from None
    return ds


def _load_hub(cfg: DataConfig):
    """A Hub dataset through the datasets cache; with HF_HUB_OFFLINE=1 (or no network) only a cached one loads."""
    import datasets

    name = repr(cfg.dataset) + (f" (subset {cfg.subset!r})" if cfg.subset else "")
    try:
        return datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split)
    except ConnectionError as e:  # offline, or no network: the cache did not have it
        offline = "HF_HUB_OFFLINE is set" if datasets.config.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise UserError(f"data.dataset: {name} is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
                        f"and {offline}: {_first_line(e)}") from None
    except FileNotFoundError as e:  # datasets.exceptions.DatasetNotFoundError: no such dataset, or no access
        raise UserError(f"data.dataset: {name}: {_first_line(e)}") from None
    except ValueError as e:  # an unknown subset or split: the message lists the known ones
        raise UserError(f"data.dataset: {name}, split {cfg.split!r}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_columns(cfg: DataConfig, has: list[str], where: str) -> None:
    """Every mapped column is there, and some column gives the prompt: else one line naming what it has."""
    for field, column in cfg.columns.items():
        if column not in has:
            raise UserError(f"{where}: data.columns.{field}: no column {column!r}; it has {has}")
    if not {"messages", "prompt"} & (set(cfg.columns) | set(has)):
        raise UserError(f"{where}: needs a 'messages' or 'prompt' column (map one with data.columns, "
                        f"e.g. {{prompt: question}}); it has {has}")


def _mapped(row: Any, cfg: DataConfig, where: str) -> Any:
    """A record under our field names (`cfg.columns`), its answer cut after `cfg.answer_after`."""
    if not isinstance(row, dict) or not (cfg.columns or cfg.answer_after):
        return row
    out = dict(row)
    for field, column in cfg.columns.items():
        if column not in row:
            raise UserError(f"{where}: data.columns.{field}: no column {column!r}; it has {sorted(map(str, row))}")
        out[field] = row[column]
    if "prompt" in cfg.columns:
        out.pop("messages", None)  # a mapped prompt wins over a `messages` column the data happens to have
    if "messages" in cfg.columns:
        out.pop("prompt", None)
    if "tests" in cfg.columns:
        out["meta"] = {**(row.get("meta") if isinstance(row.get("meta"), dict) else {}),
                       "tests": _tests(out.pop("tests"), where)}
    if cfg.answer_after and out.get("answer") is not None:
        out["answer"] = answer_after(str(out["answer"]), cfg.answer_after, where)
    return out


def _tests(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    raise UserError(f"{where}: tests: expected a string or a list of strings, got {_kind(value)}")


def answer_after(text: str, marker: str, where: str = "answer") -> str:
    """The text after the last `marker`, stripped; a number loses its thousands commas (gsm8k's "#### 1,000").

    >>> answer_after("She has 3 + 4 = 7 apples.\\n#### 7", "####")
    '7'
    >>> answer_after("#### 1,250", "####")
    '1250'
    """
    if marker not in text:
        raise UserError(f"{where}: answer: no {marker!r} in {text[:60]!r} (data.answer_after)")
    final = text.rsplit(marker, 1)[1].strip()
    return final.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", final) else final


def _read_jsonl(cfg: DataConfig, need_completion: bool) -> list[dict]:
    rows = []
    try:
        f = open(cfg.path, "rb")  # bytes: a bad byte is reported with its line, not as a decode traceback
    except IsADirectoryError:
        raise UserError(f"{cfg.path}: is a directory; source 'jsonl' reads a file") from None
    except OSError as e:
        raise UserError(f"{cfg.path}: cannot read: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{cfg.path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON: {e.msg}") from None
            except RecursionError:
                raise UserError(f"{where}: JSON nested too deeply") from None
            rows.append(_normalise(_mapped(row, cfg, where), cfg, where, need_completion))
    return rows[: cfg.size]


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
        expression, working = item["metadata"].get("expression"), None
        if cfg.think:
            working = column_steps(expression, answer) if cfg.working == "columns" else None
            working = working or worked_steps(expression, answer)
        think = f"<think>\n{working}\n</think>\n" if working else "<think>\n</think>\n"
        rows.append(
            _normalise(
                {"prompt": item["question"], "answer": answer, "completion": think + f"\\boxed{{{answer}}}",
                 "meta": {"task": cfg.task}},
                cfg,
                where=f"reasoning_gym:{cfg.task}",
            )
        )
    return rows


_CHAIN = re.compile(r"\s*-?\d+(\s*[-+]\s*\d+)+\s*")


def worked_steps(expression: str | None, answer: str) -> str | None:
    """The working an SFT target writes in its think block: a chain of + and - one operation per line,
    left to right (each line a small step a tiny model can learn and reuse), else `expression = answer`.

    >>> print(worked_steps("2 - 4 + 7", "5"))
    2 - 4 = -2
    -2 + 7 = 5
    >>> worked_steps("3 * 4", "12")
    '3 * 4 = 12'
    """
    if not expression:
        return None
    if not _CHAIN.fullmatch(expression):
        return f"{expression} = {answer}"
    terms = re.findall(r"[-+]|\d+", expression.replace(" ", ""))
    if terms[0] == "-":
        terms = [str(-int(terms[1]))] + terms[2:]
    value, lines = int(terms[0]), []
    for op, num in zip(terms[1::2], terms[2::2]):
        new = value + int(num) if op == "+" else value - int(num)
        lines.append(f"{value} {op} {num} = {new}")
        value = new
    return "\n".join(lines) if str(value) == str(answer).strip() else f"{expression} = {answer}"


_SUM = re.compile(r"\s*\d+(\s*\+\s*\d+)+\s*")


def column_steps(expression: str | None, answer: str) -> str | None:
    """A sum of non-negative numbers worked as on paper: one line per column from the ones, each adding that
    column's digits (0 where a number is shorter) and the carry; the answer is the last line's sum followed by
    the earlier lines' last digits. None for any other expression, or if `answer` is not the sum.

    >>> print(column_steps("47 + 35", "82"))
    7 + 5 = 12
    4 + 3 + 1 = 8
    >>> print(column_steps("5 + 96", "101"))
    5 + 6 = 11
    0 + 9 + 1 = 10
    >>> column_steps("7 - 3", "4") is None
    True
    """
    if not expression or not _SUM.fullmatch(expression):
        return None
    numbers = re.findall(r"\d+", expression)
    if str(sum(map(int, numbers))) != str(answer).strip():
        return None
    width = max(len(n) for n in numbers)
    carry, lines = 0, []
    for column in zip(*(n.zfill(width)[::-1] for n in numbers)):
        total = sum(int(d) for d in column) + carry
        lines.append(" + ".join(list(column) + ([str(carry)] if carry else [])) + f" = {total}")
        carry = total // 10
    return "\n".join(lines)


def _normalise(row: Any, cfg: DataConfig, where: str, need_completion: bool = False) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with 'messages' or 'prompt', got {_kind(row)}")
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise UserError(f"{where}: messages: expected a non-empty list of {{role, content}} mappings of strings")
    elif "prompt" in row:
        if not isinstance(row["prompt"], (str, int, float)) or isinstance(row["prompt"], bool):
            raise UserError(f"{where}: prompt: expected a string, got {_kind(row['prompt'])}")
        messages = [{"role": "user", "content": str(row["prompt"])}]
    else:
        raise UserError(f"{where}: needs 'messages' or 'prompt', has {sorted(map(str, row))}")
    completion = row.get("completion")
    if completion is None and need_completion:
        raise UserError(f"{where}: completion: missing; every SFT sample needs the target text")
    if completion is not None and not isinstance(completion, str):
        raise UserError(f"{where}: completion: expected a string, got {_kind(completion)}")
    for key, types in (("domain", str), ("meta", dict), ("answer", (str, int, float)), ("id", (str, int))):
        if row.get(key) is not None and not isinstance(row[key], types):
            raise UserError(f"{where}: {key}: expected {_kind(types)}, got {_kind(row[key])}")
    if cfg.system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system}] + messages
    meta = dict(row.get("meta") or {})
    if "instruction_id_list" in row:  # IFEval's own rows carry their instructions at the top level
        meta.update(instruction_id_list=row["instruction_id_list"], kwargs=row.get("kwargs"))
    if "instruction_id_list" in meta:
        from rewards.ifeval import validate_instructions

        ids, kwargs = meta["instruction_id_list"], meta.get("kwargs")
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)) or not (
                kwargs is None or isinstance(kwargs, list) and all(k is None or isinstance(k, dict) for k in kwargs)):
            raise UserError(f"{where}: instruction_id_list / kwargs: expected a list of ids and a list of objects")
        try:
            validate_instructions(ids, kwargs)
        except ValueError as e:
            raise UserError(f"{where}: instruction_id_list: {e}") from None
    key = json.dumps(messages, sort_keys=True)
    return {
        "id": str(row.get("id") or hashlib.sha1(key.encode()).hexdigest()[:12]),
        "domain": row.get("domain") or cfg.domain,
        "messages": messages,
        "answer": None if row.get("answer") is None else str(row["answer"]),
        "completion": completion,
        "meta": meta,
    }


def _kind(value: Any) -> str:
    """A JSON reader's name for a value's type (or for a type, or a tuple of types)."""
    names = {str: "a string", int: "a number", float: "a number", bool: "true/false", dict: "an object",
             list: "a list", type(None): "null"}
    if isinstance(value, tuple):
        return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in value))
    if isinstance(value, type):
        return names.get(value, value.__name__)
    return names.get(type(value), type(value).__name__)


def _dedupe(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        key = prompt_key(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    from pipeline.context import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in rows))
