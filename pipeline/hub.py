"""Hugging Face hub ids as model references: `Qwen/Qwen2.5-0.5B-Instruct` or `org/name@revision`.

A model field that is neither a stage nor an existing local path, and reads as a hub id, resolves
to its snapshot directory in the hub cache through `huggingface_hub.snapshot_download`, so
HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN mean what they mean everywhere else. Offline
(HF_HUB_OFFLINE=1, or no network) the cache is all there is, and a model missing from it is one
line naming the cache. Validation fetches no weights: it reads the cache, or fetches config.json
alone; the stage that loads the model downloads the rest.

Shortcut: the path is resolved where `StageContext.model_path` runs (the stage's driver) and
handed to workers as is, so workers on other nodes need the same cache on a shared filesystem,
as they already do for a local checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import UserError

# A bare `name` (no namespace) is far likelier a misspelt stage or local path than a model, so only
# `namespace/name` reads as a hub id; a revision may itself hold slashes (`refs/pr/1`).
_HUB_ID = re.compile(r"([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?")
# Formats `AutoModelForCausalLM.from_pretrained` never reads: a repo may ship gigabytes of them.
_NOT_LOADED = ["original/*", "*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.ot", "*.tflite"]


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `ref` reads as a hub id, else None.

    >>> parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct@main")
    ('Qwen/Qwen2.5-0.5B-Instruct', 'main')
    >>> parse_hub_id("/abs/ckpt") is None, parse_hub_id("runs/x/sft/model") is None, parse_hub_id("a--b/c") is None
    (True, True, True)
    """
    m = _HUB_ID.fullmatch(ref)
    if m is None or "--" in m[1] or ".." in m[1] or len(m[1]) > 96:  # the hub's own rules for repo ids
        return None
    return m[1], m[2]


def resolve(ref: str, config_only: bool = False) -> Path:
    """The local snapshot directory of hub id `ref`, downloaded into the hub cache if it is not there.

    config_only: download nothing but config.json (validation); a snapshot already cached is used as it is.
    Raises UserError, one line naming `ref` and the cache, if it cannot be had.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, revision = parse_hub_id(ref) or (None, None)
    if repo is None:
        raise UserError(f"{ref!r} is not a hub id (expected 'org/name' or 'org/name@revision')")
    try:  # online it checks the hub for the newest commit; offline or unreachable it reads the cache
        return Path(snapshot_download(repo, revision=revision, ignore_patterns=_NOT_LOADED,
                                      allow_patterns=["config.json"] if config_only else None))
    except (OSError, ValueError, EntryNotFoundError) as e:
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else _first_line(e)
        raise UserError(f"{ref!r} is not a stage, a local checkpoint, or a hub id in the cache at "
                        f"{constants.HF_HUB_CACHE} ({why})") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
