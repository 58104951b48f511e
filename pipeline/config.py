"""Workflow files: load, validate, and fail with one line that names the file, field and value.

A workflow is a YAML mapping:

    name: quickstart
    stages:
      base:     {kind: base_model, config: {...}}
      sft_math: {kind: sft, needs: [base], config: {model: base, ...}}

Each stage's `config` is validated by its kind's pydantic model (`pipeline.stages`). Fields typed
`ModelRef` or `PathRef` name another stage (which must be in `needs`) or an existing local path; a
`ModelRef` may also be a Hugging Face hub id (`org/name[@revision]`, `pipeline.hub`).

Hostile or careless input is refused here, before anything runs: names that could leave the runs
directory, non-finite or unrunnable numbers, duplicate YAML keys, files over 1 MiB and alias bombs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.tracking import TrackingConfig, missing_package
from sandbox.service import ServiceConfig


class UserError(Exception):
    """A mistake in the user's input. The CLI prints it as one line, without a traceback."""


# Stage fields that moved into a block: trainer fields into `learner:` (learner.config.LearnerConfig),
# OPD's sampling fields into `rollout:` (rollout.config.RolloutConfig).
MOVED = {"threads": "learner.threads", "num_cpus": "learner.cpus_per_worker", "num_gpus": "learner.gpus_per_worker",
         "precision": "learner.dtype' or 'learner.mixed_precision", "max_new_tokens": "rollout.max_new_tokens",
         "temperature": "rollout.temperature", "top_p": "rollout.top_p", "generate_batch_size": "rollout.batch_size",
         "device": "learner.gpus_per_worker"}


class StageFailed(RuntimeError):
    """A stage could not finish for a reason outside the user's input (a worker died, say); the CLI
    prints it as one line and exits 1."""


# ---- bounds: what a config may ask for and still run (a bigger value is a typo, or an attack)
MAX_YAML_BYTES = 1 << 20  # a workflow file is a page of YAML, not a data set
MAX_YAML_NODES = 100_000  # after alias expansion: a "billion laughs" file expands past this at once
MAX_NAME = 64  # workflow and stage names become directory names
MAX_STEPS = 1_000_000  # optimizer steps, rounds
MAX_BATCH = 1 << 16  # sequences, prompts or pairs per batch
MAX_TOKENS = 1 << 20  # tokens of one sequence, response or micro-batch
MAX_WIDTH = 1 << 16  # hidden and MLP widths of a model built from a config
MAX_LAYERS = 256  # transformer blocks / attention heads of a model built from a config
MAX_VOCAB = 1 << 20  # tokenizer vocabulary

NAME_RE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}")

# Shared constrained types: every stage config uses these, so a bound is written once.
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
LearningRate = Annotated[float, Field(gt=0, le=1)]  # finite: StageConfig has allow_inf_nan=False


def check_name(what: str, name: str) -> str | None:
    """Why `name` cannot name a directory under runs/, or None if it can.

    >>> check_name("stage", "sft_math.v2") is None
    True
    >>> check_name("stage", "..")
    "stage name '..' must be 1-64 letters, digits, '_', '-' or '.', not starting with '.' or '-'"
    """
    if isinstance(name, str) and NAME_RE.fullmatch(name):
        return None
    return (f"{what} name {_short(name)} must be 1-{MAX_NAME} letters, digits, '_', '-' or '.', "
            f"not starting with '.' or '-'")


def _short(value: Any, width: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= width else shown[: width - 3] + "..."


def _non_finite(value: Any, path: str = ""):
    """The dotted path of the first NaN or infinite float anywhere inside `value`, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(value)"
    if isinstance(value, BaseModel):
        items = ((k, getattr(value, k)) for k in type(value).model_fields)
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


@dataclass(frozen=True)
class Ref:
    """Marks a string field as a reference to a stage's output or to a local path."""

    what: str  # "model": a stage's model/ or an HF checkpoint dir; "path": a file or dir
    urls: bool = False  # also an fsspec URL (s3://, gs://, ...), fetched by the stage that reads it


ModelRef = Annotated[str, Ref("model")]
StorageModelRef = Annotated[str, Ref("model", urls=True)]  # a model that may live in object storage
PathRef = Annotated[str, Ref("path")]


class StageConfig(BaseModel):
    """Base of every stage config: unknown fields are errors, floats are finite, a validated config is frozen.

    Besides its own float fields, any float nested in it (a dict of weights, a task's arguments,
    a nested model that is not a StageConfig) must be finite too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _all_floats_finite(self):
        bad = _non_finite(self)
        if bad:
            raise ValueError(f"{bad}: expected a finite number, got {_short(_lookup(self, bad))}")
        return self


def _lookup(value: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(value, BaseModel):
            value = getattr(value, part)
        elif isinstance(value, dict):
            value = value.get(part, next((v for k, v in value.items() if str(k) == part), None))
        elif isinstance(value, (list, tuple)):
            value = value[int(part)]
    return value


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(description="Which stage to run: one of pipeline.stages.STAGES.")
    needs: list[str] = Field(default_factory=list, description="Stages that must finish first.")
    config: dict[str, Any] = Field(default_factory=dict, description="The kind's own config.")


class WorkflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Names the run directory runs/<name>/: 1-64 letters, digits, '_', '-', '.' "
                                  "(not first).")
    seed: int = Field(0, ge=0, lt=1 << 32, description="Base seed; each stage derives its own from it.")
    stages: dict[str, StageSpec] = Field(description="Stages by name (same rule as `name`), in any order.")
    sandbox: ServiceConfig | None = Field(None, description="One sandbox service per node, shared by every stage "
                                          "(code rewards, agent rollouts, eval); none: each user starts its own pool.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Also send each stage's metrics "
                                     "and config to TensorBoard, W&B or MLflow (pipeline.tracking); metrics.jsonl always.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        problem = check_name("workflow", v)
        if problem:
            raise ValueError(problem)
        return v


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    needs: tuple[str, ...]
    config: StageConfig
    seed: int = 0  # the workflow's seed plus a hash of the stage's name: stages draw different streams
    overrides: tuple[str, ...] = ()  # the command-line overrides that set something in this stage


def stage_seed(workflow_seed: int, name: str) -> int:
    """The seed a stage runs with (stable across runs and machines: crc32, not Python's hash)."""
    return workflow_seed + zlib.crc32(name.encode()) % 10_000


@dataclass(frozen=True)
class Workflow:
    path: Path
    name: str
    seed: int
    stages: dict[str, Stage]  # in dependency order
    sandbox: ServiceConfig | None = None
    overrides: tuple[str, ...] = ()  # the command line's `key=value` overrides, already applied
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)


def load_workflow(path: str | Path, overrides: Sequence[str] = ()) -> Workflow:
    """Read and validate a workflow file, with command-line `overrides` (`stages.x.config.lr=1e-4`)
    applied first; raise `UserError` with a one-line message on any mistake."""
    from pipeline.overrides import apply_overrides, blame

    path = Path(path)
    where = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with 'name' and 'stages', got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides, where)
    try:
        return _load(raw, path, tuple(overrides))
    except UserError as e:
        raise UserError(blame(str(e), where, overrides)) from None


def _load(raw: dict, path: Path, overrides: tuple[str, ...]) -> Workflow:
    from pipeline.stages import STAGES, stage_module

    where = str(path)
    spec = _validate(WorkflowSpec, raw, where, prefix="")
    if not spec.stages:
        raise UserError(f"{where}: stages: no stages; a workflow needs at least one")
    missing = missing_package(spec.tracking)
    if missing:
        raise UserError(f"{where}: {missing}")

    stages: dict[str, Stage] = {}
    for name, st in spec.stages.items():
        problem = check_name("stage", name)
        if problem:
            raise UserError(f"{where}: stages: {problem}")
        at = f"stages.{name}"
        if st.kind not in STAGES:
            raise UserError(
                f"{where}: {at}.kind: unknown kind {st.kind!r}{_did_you_mean(st.kind, STAGES)}; "
                f"expected one of {', '.join(sorted(STAGES))}"
            )
        for dep in st.needs:
            if dep not in spec.stages:
                raise UserError(
                    f"{where}: {at}.needs: no stage named {dep!r}{_did_you_mean(dep, spec.stages)}"
                )
        cls = stage_module(st.kind).Config
        cfg = _validate(cls, st.config, where, prefix=f"{at}.config.")
        for field_path, ref, value in _refs(cfg):
            _check_ref(where, f"{at}.config.{field_path}", ref, value, name, st.needs, spec.stages)
        keys = (o.lstrip("+~").split("=", 1)[0] for o in overrides)
        mine = tuple(o for o, k in zip(overrides, keys) if k in ("seed", at) or k.startswith(f"{at}."))
        stages[name] = Stage(name, st.kind, tuple(st.needs), cfg, stage_seed(spec.seed, name), mine)

    order = _topo_order(stages, where)
    return Workflow(path, spec.name, spec.seed, {n: stages[n] for n in order}, spec.sandbox, overrides, spec.tracking)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_short(key)} (first at line {first[key]})", key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file of at most MAX_YAML_BYTES whose aliases expand to at most MAX_YAML_NODES nodes."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where}: is a directory, expected a workflow file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read: {e}") from None
    if len(data) > MAX_YAML_BYTES:
        raise UserError(f"{where}: larger than {MAX_YAML_BYTES} bytes; a workflow file is a page of YAML")
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set(), where)
        if size > MAX_YAML_NODES:
            raise UserError(f"{where}: aliases expand to more than {MAX_YAML_NODES} YAML nodes; refusing "
                            f"(an alias bomb?)")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: not valid YAML{at}: {problem}") from None
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _expanded_size(node, sizes: dict[int, int], open_: set[int], where: str) -> int:
    """Nodes in `node` once every alias is expanded; memoised, so a bomb costs only its own size."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise UserError(f"{where}: line {node.start_mark.line + 1}: a YAML alias refers to a node that contains it (a recursive alias)")
    open_.add(id(node))
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes, open_, where) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, sizes, open_, where) + _expanded_size(v, sizes, open_, where) for k, v in node.value)
    open_.discard(id(node))
    sizes[id(node)] = total = min(total, MAX_YAML_NODES + 1)  # capped: big ints stay cheap
    return total


def _validate(cls: type[BaseModel], data: Any, where: str, prefix: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(_one_line(e, cls, where, prefix)) from None


def _one_line(e: ValidationError, cls: type[BaseModel], where: str, prefix: str) -> str:
    # A misspelled field also reports the real one as missing: name the misspelling first.
    err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
    loc = ".".join(str(p) for p in err["loc"])
    dotted = prefix + loc if loc else prefix.rstrip(".") or "(top level)"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        known = _fields_at(cls, err["loc"][:-1])
        field = str(err["loc"][-1])
        hint = _did_you_mean(field, known) if known else ""
        if field in MOVED and MOVED[field].split(".")[0] in known:
            hint = f" (moved: did you mean '{MOVED[field]}'?)"
        listing = f"; expected one of {', '.join(sorted(known))}" if known and not hint else ""
        return f"{where}: {dotted}: unknown field{hint}{listing}"
    if err["type"] == "missing":
        return f"{where}: {dotted}: required field is missing"
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    more = f" (and {e.error_count() - 1} more errors)" if e.error_count() > 1 else ""
    return f"{where}: {dotted}: {err['msg'].rstrip('.')}, got {shown}{more}"


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) pydantic model at `loc` inside `cls`, for did-you-mean hints."""
    from typing import get_args

    model: Any = cls
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = field.annotation
        for arg in (model, *get_args(model)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
                break
            for inner in get_args(arg):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _refs(cfg: BaseModel, prefix: str = ""):
    """Yield (dotted field path, Ref, value) for every ModelRef/PathRef value inside `cfg`."""
    for name, field in type(cfg).model_fields.items():
        value, ref, here = getattr(cfg, name), _field_ref(field.annotation, field.metadata), f"{prefix}{name}"
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, (list, tuple)):
            items = enumerate(value)
        else:
            items = [(None, value)]
        for key, v in items:
            at = here if key is None else f"{here}.{key}"
            if isinstance(v, BaseModel):
                yield from _refs(v, at + ".")
            elif ref is not None and isinstance(v, str):
                yield at, ref, v


def _field_ref(annotation, metadata=()) -> Ref | None:
    """The Ref marking a field, also when it sits inside Optional[...], list[...] or dict[..., ...]."""
    from typing import get_args

    for meta in (*metadata, *getattr(annotation, "__metadata__", ())):
        if isinstance(meta, Ref):
            return meta
    for arg in get_args(annotation):
        found = _field_ref(arg)
        if found is not None:
            return found
    return None


def _check_ref(where, dotted, ref: Ref, value: str, stage: str, needs, all_stages) -> None:
    if value in all_stages:
        if value == stage:
            raise UserError(f"{where}: {dotted}: stage {stage!r} cannot use its own output")
        if value not in needs:
            raise UserError(f"{where}: {dotted}: uses stage {value!r}, so add it to stages.{stage}.needs")
        return
    if ref.urls and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value):
        return  # an fsspec URL (s3://, gs://, file://, ...): the stage that reads it fetches it, not validation
    p = Path(value)
    if not p.exists() and ref.what == "model":
        from pipeline import hub

        if hub.parse_hub_id(value):
            try:
                p = hub.resolve(value, config_only=True)
            except UserError as e:
                raise UserError(f"{where}: {dotted}: {e}") from None
    if not p.exists():
        what = "a stage name or an existing checkpoint directory" if ref.what == "model" else "an existing file"
        raise UserError(f"{where}: {dotted}: {value!r} does not exist; expected {what}")
    if ref.what == "model":
        problem = checkpoint_problem(p)
        if problem:
            raise UserError(f"{where}: {dotted}: {value!r} is not a Hugging Face checkpoint ({problem})")


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be a Hugging Face checkpoint directory, or None if it looks like one."""
    if not path.is_dir():
        return "not a directory"
    config = path / "config.json"
    if not config.exists():
        return "no config.json"
    try:
        data = json.loads(config.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"config.json is not valid JSON: {str(e).splitlines()[0]}"
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        return "config.json has no 'model_type'"
    return None


def _topo_order(stages: dict[str, Stage], where: str) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(n: str, trail: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = trail[trail.index(n):] + [n]
            raise UserError(f"{where}: stages.{n}.needs: dependency cycle {' -> '.join(cycle)}")
        state[n] = 1
        for dep in stages[n].needs:
            visit(dep, trail + [n])
        state[n] = 2
        order.append(n)

    for n in stages:
        visit(n, [])
    return order
