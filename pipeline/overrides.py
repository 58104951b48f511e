"""Command-line overrides of a workflow file, as Hydra users type them.

    python -m pipeline run workflows/quickstart.yaml stages.grpo_math.config.lr=1e-4 seed=3

Each override is `dotted.key=VALUE` (Hydra's `+dotted.key=VALUE` is the same here) or `~dotted.key`
(remove the key, so the field takes its default). VALUE is read as YAML (`3`, `true`, `null`,
`[math, code]`, `{r: 8}`), and a number written `1e-4` is a number, as on any command line (YAML 1.1
would keep it a string). A list element is addressed by its index (`stages.x.config.data.0.size=50`).

Overrides are applied to the file's mapping before validation, so the same pydantic models check
them and a mistake is the same one-line error, with the override that caused it named; the
resolved config each stage writes (`config.yaml`, hashed into `DONE.json`) includes them, so a
finished stage rerun with a different override is refused until `--force`, as an edited file is.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Sequence

import yaml

from pipeline.config import UserError, _did_you_mean, _short

MAX_OVERRIDES = 256  # a command line, not a config file
MAX_OVERRIDE_CHARS = 4096
_KEY = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_SET = re.compile(rf"\+?(?P<key>{_KEY})=(?P<value>.*)", re.DOTALL)
_DEL = re.compile(rf"~(?P<key>{_KEY})")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_value(text: str) -> Any:
    """An override's VALUE as YAML, with exponent numbers read as numbers.

    >>> parse_value("1e-4"), parse_value("3"), parse_value("[math, code]"), parse_value("null")
    (0.0001, 3, ['math', 'code'], None)
    >>> parse_value("sft_math"), parse_value("'3'")
    ('sft_math', '3')
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"not valid YAML: {problem}") from None
    if isinstance(value, str) and value == text and _NUMBER.fullmatch(text):
        return float(text) if any(c in text for c in ".eE") else int(text)
    return value


def apply_overrides(raw: dict, overrides: Sequence[str], where: str) -> dict:
    """`raw` (a workflow file's mapping) with each override applied in order; the input is not changed.

    >>> raw = {"name": "w", "stages": {"sft": {"kind": "sft", "config": {"lr": 0.001}}}}
    >>> apply_overrides(raw, ["stages.sft.config.lr=1e-4", "seed=3"], "w.yaml")["stages"]["sft"]["config"]
    {'lr': 0.0001}
    >>> apply_overrides(raw, ["stages.sfx.config.lr=1"], "w.yaml")
    Traceback (most recent call last):
    ...
    pipeline.config.UserError: w.yaml: override 'stages.sfx.config.lr=1': no stage 'sfx' (did you mean 'sft'?)
    """
    if len(overrides) > MAX_OVERRIDES:
        raise UserError(f"{where}: {len(overrides)} overrides; at most {MAX_OVERRIDES}")
    out = copy.deepcopy(raw)
    for text in overrides:
        shown = text if len(text) <= 80 else text[:77] + "..."
        if len(text) > MAX_OVERRIDE_CHARS:
            raise UserError(f"{where}: override {shown!r}: longer than {MAX_OVERRIDE_CHARS} characters")
        m_set, m_del = _SET.fullmatch(text), _DEL.fullmatch(text)
        if not (m_set or m_del):
            raise UserError(f"{where}: override {shown!r}: expected KEY=VALUE or ~KEY, with KEY a dotted path "
                            f"such as stages.sft_math.config.lr")
        key = (m_set or m_del)["key"]
        try:
            value = parse_value(m_set["value"]) if m_set else None
            _apply(out, key.split("."), value, delete=m_del is not None)
        except ValueError as e:
            raise UserError(f"{where}: override {shown!r}: {e}") from None
    return out


def _apply(node: Any, parts: list[str], value: Any, delete: bool) -> None:
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[:depth]) or "the file"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"{here} is a list of {len(node)}; {part!r} is not an index into it")
            part = int(part)
        elif not isinstance(node, dict):
            raise ValueError(f"{here} is {_short(node, 40)}, not a mapping or a list")
        elif part not in node and depth == 1 and parts[0] == "stages":
            raise ValueError(f"no stage {part!r}{_did_you_mean(part, node)}")
        if last:
            if delete:
                if isinstance(node, list) or part not in node:
                    raise ValueError(f"{'.'.join(parts)} is not set in the file; nothing to remove")
                del node[part]
            else:
                node[part] = value
            return
        if isinstance(node, dict) and node.get(part) is None:
            node[part] = {}  # a block the file leaves to its defaults (`learner:`, say)
        node = node[part]


def blame(message: str, where: str, overrides: Sequence[str]) -> str:
    """`message` (a one-line validation error) with the override that set its field named, if one did.

    >>> blame("w.yaml: stages.sft.config.lr: Input should be greater than 0, got -1", "w.yaml",
    ...       ["seed=1", "stages.sft.config.lr=-1"])
    "w.yaml: stages.sft.config.lr: Input should be greater than 0, got -1 (set by override 'stages.sft.config.lr=-1')"
    """
    m = re.match(rf"{re.escape(where)}: ([^ :]+):", message)
    if not m:
        return message
    field = m[1]
    for text in reversed(overrides):
        key = text.lstrip("+~").split("=", 1)[0]
        if field == key or field.startswith(key + ".") or key.startswith(field + "."):
            return f"{message} (set by override {text!r})"
    return message
