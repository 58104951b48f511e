"""Standard benchmarks in the `eval` stage: lm-eval-harness tasks (its own, or a user's task YAMLs) scored on
workflow checkpoints, one headline metric per task.

The harness runs through its Python API with its `hf` model (transformers), in one Ray task per model beside
the eval stage's own scoring tasks, so it takes the same CPU/GPU share (`eval.num_gpus`). Nothing here reaches
a hub unless a task's dataset lives there: a task on a local file (`dataset_path: json`,
`dataset_kwargs: {data_files: {test: path.jsonl}}`) runs offline.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from pipeline.config import BatchSize, ModelRef, PathRef, StageConfig


class LmEvalConfig(StageConfig):
    include_path: PathRef | None = Field(None, description="Directory of the user's own task YAMLs (lm-eval's "
                                         "TaskManager include_path); its names override lm-eval's.")
    tasks: list[str] = Field(min_length=1, description="lm-eval task, group or tag names, e.g. [gsm8k, "
                             "arc_easy], or names defined by the YAMLs under include_path.")
    models: list[ModelRef] | None = Field(None, min_length=1, description="Checkpoints to run them on: stage "
                                          "names or local HF checkpoint dirs (default: the eval stage's models).")
    limit: int | None = Field(None, ge=1, description="Score at most this many documents per task (default: all).")
    num_fewshot: int | None = Field(None, ge=0, le=1024, description="Few-shot examples per prompt (default: each "
                                    "task's own).")
    batch_size: BatchSize = Field(8, description="Requests per forward pass.")
    apply_chat_template: bool = Field(False, description="Wrap prompts in the checkpoint's chat template (for chat "
                                      "models scored on chat-style tasks).")

    @field_validator("tasks")
    @classmethod
    def _tasks_known(cls, tasks: list[str], info: ValidationInfo) -> list[str]:
        # Checked here so a typo fails `pipeline validate`, not the eval stage after hours of training. An
        # include_path that does not exist is left to the workflow's path check, which names it.
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:  # an optional extra
            raise ValueError("the lm-eval package is not installed; pip install -e '.[lm-eval]' (or lm-eval)")
        include = info.data.get("include_path")
        problem = unknown_task(tasks, include if include and Path(include).is_dir() else None)
        if problem:
            raise ValueError(problem)
        return tasks


@functools.lru_cache(maxsize=8)
def _index(include_path: str | None, defaults: bool) -> dict[str, tuple[str, ...]]:
    """Every task, group and tag name lm-eval indexes -> the names a group is built from (indexing lm-eval's
    own thousands of tasks takes seconds: cached per process)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    index = TaskManager(include_path=include_path, include_defaults=defaults).task_index
    members = {n: e.cfg.get("task", []) if e.kind == Kind.GROUP and e.cfg else [] for n, e in index.items()}
    return {n: tuple(m if isinstance(m, str) else str(m.get("task") or m.get("group")) for m in
                     (ms if isinstance(ms, list) else [ms])) for n, ms in members.items()}


def own_tasks(tasks: list[str], include_path: str | None) -> bool:
    """Whether `tasks`, and every task their groups name, are defined under `include_path` (then lm-eval's own
    tasks need not be indexed)."""
    if not include_path:
        return False
    index, todo, seen = _index(include_path, False), list(tasks), set()
    while todo:
        name = todo.pop()
        if name not in index:
            return False
        if name not in seen:
            seen.add(name)
            todo.extend(index[name])
    return True


@functools.lru_cache(maxsize=1)
def _builtin_names() -> frozenset[str]:
    """The names lm-eval's own task YAMLs give on a `task:`, `group:` or `tag:` line: a text scan, ten times
    quicker than indexing them. It misses generated and listed names (those take the full index)."""
    import lm_eval.tasks

    line = re.compile(r"^(?:task|group|tag):[ \t]*[\"']?([\w.\-]+)", re.M)
    return frozenset(name for f in Path(lm_eval.tasks.__file__).parent.rglob("*.yaml")
                     for name in line.findall(f.read_text(errors="replace")))


def unknown_task(tasks: list[str], include_path: str | None) -> str | None:
    """Why one of `tasks` cannot run (no task of that name), or None when lm-eval knows them all."""
    if own_tasks(tasks, include_path):
        return None
    if all(t in _builtin_names() or (include_path and t in _index(include_path, False)) for t in tasks):
        return None
    known = _index(include_path, True)
    for t in tasks:
        if t not in known:
            close = difflib.get_close_matches(t, list(known), n=1, cutoff=0.75)
            where = f" nor under include_path {include_path}" if include_path else ""
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{t!r} is not an lm-eval task, group or tag{where}{hint}"
    return None


def run_benchmarks(model_path: str, cfg: LmEvalConfig, threads: int = 0, device: str = "cpu") -> dict[str, Any]:
    """lm-eval's results for one checkpoint: the headline score of each task and every metric it reported."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from experts.train import set_threads

    set_threads(threads)
    manager = TaskManager(include_path=cfg.include_path, include_defaults=not own_tasks(cfg.tasks, cfg.include_path))
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": model_path}, tasks=list(cfg.tasks), task_manager=manager,
        num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size, limit=cfg.limit, device=device,
        apply_chat_template=cfg.apply_chat_template, log_samples=False)
    return {"scores": headline_scores(out, cfg.tasks), "metrics": numeric_metrics(out["results"])}


def headline(row: dict[str, Any]) -> tuple[str, float] | None:
    """A task's first reported metric (the first of its metric_list, first filter) and its value.

    >>> headline({"alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
    ...           "exact_match,flexible-extract": 0.6})
    ('exact_match,strict-match', 0.5)
    >>> headline({"alias": "mmlu"}) is None
    True
    """
    for key, value in row.items():
        if "," in key and not key.split(",")[0].endswith("_stderr") and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            return key, float(value)
    return None


def headline_scores(out: dict[str, Any], requested: list[str]) -> dict[str, dict[str, Any]]:
    """One entry per requested task or group with a metric: {metric, score, n}. A group without an aggregate
    metric, or a tag, stands for its tasks, each reported under its own name.

    >>> out = {"results": {"toy": {"acc,none": 0.25}, "g": {"alias": "g"}, "a": {"acc,none": 1.0}},
    ...        "group_subtasks": {"g": ["a"]}, "n-samples": {"toy": {"effective": 4}, "a": {"effective": 2}}}
    >>> headline_scores(out, ["toy", "g"])
    {'toy': {'metric': 'acc,none', 'score': 0.25, 'n': 4}, 'a': {'metric': 'acc,none', 'score': 1.0, 'n': 2}}
    """
    rows, groups, counts = out["results"], out.get("group_subtasks", {}), out.get("n-samples", {})
    scores: dict[str, dict[str, Any]] = {}
    covered: set[str] = set()

    def leaves(name: str) -> list[str]:
        return [leaf for child in groups[name] for leaf in leaves(child)] if name in groups else [name]

    def take(name: str) -> None:
        covered.add(name)
        found = headline(rows.get(name, {}))
        if found:
            covered.update(leaves(name))
            n = sum(counts.get(leaf, {}).get("effective", 0) for leaf in leaves(name))
            scores[name] = {"metric": found[0], "score": found[1], "n": n}
            return
        for child in groups.get(name, []):
            take(child)

    for name in requested:
        if name in rows or name in groups:
            take(name)
    children = {c for cs in groups.values() for c in cs}
    for name in rows:  # a tag's tasks: top-level in the results, named by no request
        if name not in covered and name not in children:
            take(name)
    return scores


def numeric_metrics(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every number lm-eval reported per task (stderr included; "N/A" and aliases left out)."""
    return {task: {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, row in rows.items()}
