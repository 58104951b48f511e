"""Workflow files: load, validate, and fail with one line that names the file, field and value.

A workflow is a YAML mapping:

    name: quickstart
    stages:
      base:     {kind: base_model, config: {...}}
      sft_math: {kind: sft, needs: [base], config: {model: base, ...}}

Each stage's `config` is validated by its kind's pydantic model (`pipeline.stages`). Fields typed
`ModelRef` or `PathRef` name another stage (which must be in `needs`) or an existing local path.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class UserError(Exception):
    """A mistake in the user's input. The CLI prints it as one line, without a traceback."""


@dataclass(frozen=True)
class Ref:
    """Marks a string field as a reference to a stage's output or to a local path."""

    what: str  # "model": a stage's model/ or an HF checkpoint dir; "path": a file or dir


ModelRef = Annotated[str, Ref("model")]
PathRef = Annotated[str, Ref("path")]


class StageConfig(BaseModel):
    """Base of every stage config: unknown fields are errors and a validated config is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(description="Which stage to run: one of pipeline.stages.STAGES.")
    needs: list[str] = Field(default_factory=list, description="Stages that must finish first.")
    config: dict[str, Any] = Field(default_factory=dict, description="The kind's own config.")


class WorkflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Names the run directory: runs/<name>/<stage>/.")
    seed: int = Field(0, description="Base seed; each stage derives its own from it.")
    stages: dict[str, StageSpec] = Field(description="Stages by name, in any order.")


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    needs: tuple[str, ...]
    config: StageConfig


@dataclass(frozen=True)
class Workflow:
    path: Path
    name: str
    seed: int
    stages: dict[str, Stage]  # in dependency order


def load_workflow(path: str | Path) -> Workflow:
    """Read and validate a workflow file; raise `UserError` with a one-line message on any mistake."""
    from pipeline.stages import STAGES, stage_module

    path = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: not valid YAML{at}: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with 'name' and 'stages', got {type(raw).__name__}")
    spec = _validate(WorkflowSpec, raw, where, prefix="")

    stages: dict[str, Stage] = {}
    for name, st in spec.stages.items():
        at = f"stages.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise UserError(f"{where}: {at}: stage name {name!r} may use only letters, digits, '_', '-', '.'")
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
        stages[name] = Stage(name, st.kind, tuple(st.needs), cfg)

    order = _topo_order(stages, where)
    return Workflow(path, spec.name, spec.seed, {n: stages[n] for n in order})


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
    p = Path(value)
    if not p.exists():
        what = "a stage name or an existing checkpoint directory" if ref.what == "model" else "an existing file"
        raise UserError(f"{where}: {dotted}: {value!r} does not exist; expected {what}")
    if ref.what == "model" and not (p / "config.json").exists():
        raise UserError(f"{where}: {dotted}: {value!r} is not a Hugging Face checkpoint (no config.json)")


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
