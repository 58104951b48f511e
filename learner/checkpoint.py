"""Resumable checkpoints: sharded model + optimizer state (torch.distributed.checkpoint), loadable
by any number of workers, plus the trainer state beside them.

    checkpoints/step_N/
        dcp/            each rank's shards of model and optimizer state (DCP reshards on load); with
                        LoRA only the adapters and their optimizer state
        trainer.pt      optimizer steps taken, LR schedule, RNG (rank 0's); the stage's own step is N
        COMPLETE        written last: a step_N without it is an interrupted save and is ignored

The final `model/` is a full, gathered Hugging Face checkpoint (`LearnerWorker.save_hf`).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

from pipeline.context import atomic_write_text

TRAINER_STATE = "trainer.pt"


def save_sharded(path: Path, model, optimizer, scheduler, state: dict, rank: int, trainable_only: bool = False) -> None:
    """Every rank writes its shards under `path/dcp`; rank 0 adds the trainer state. Collective.

    `trainable_only` (LoRA) leaves the frozen weights out: they are the starting model's, loaded again on resume.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(ignore_frozen_params=trainable_only)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        dcp.save({"model": _only_trainable(get_model_state_dict(model, options=opts), model, trainable_only)},
                 checkpoint_id=str(path / "dcp"))
    else:
        msd, osd = get_state_dict(model, optimizer, options=opts)
        msd = _only_trainable(msd, model, trainable_only)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / "dcp"))
    if rank == 0:
        torch.save({**state, "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}, path / TRAINER_STATE)


def load_sharded(path: Path, model, optimizer, scheduler, trainable_only: bool = False) -> int:
    """Load `path`'s shards into this rank's model (and optimizer), whatever group wrote them; the step.

    `trainable_only`: as saved by `save_sharded(..., trainable_only=True)`; the frozen weights stay as loaded.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    opts = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        msd = _only_trainable(get_model_state_dict(model, options=opts), model, trainable_only)
        dcp.load({"model": msd}, checkpoint_id=str(path / "dcp"))
        set_model_state_dict(model, msd, options=opts)
    else:
        msd, osd = get_state_dict(model, optimizer, options=opts)
        state = {"model": _only_trainable(msd, model, trainable_only), "optim": osd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=opts)
    trainer = torch.load(path / TRAINER_STATE, weights_only=False)
    if scheduler is not None and trainer.get("scheduler") is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"]["torch"])
    random.setstate(trainer["rng"]["python"])
    return int(trainer["step"])


def _only_trainable(msd: dict, model, trainable_only: bool) -> dict:
    """`msd` without frozen weights when `trainable_only`; torch's ignore_frozen_params keeps a frozen tied
    head (lm_head = embed_tokens) under its second name, a copy of the largest matrix."""
    if not trainable_only:
        return msd
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in msd.items() if k in trainable}


def finish(tmp: Path, final: Path, step: int, keep: int) -> Path:
    """Publish a save written to `tmp` as `final` (COMPLETE last), then keep only the newest `keep`."""
    atomic_write_text(tmp / "COMPLETE", json.dumps({"step": step}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(final.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: str | Path) -> int:
    """The stage step a checkpoint `.../step_N` was saved after (what a resumed stage continues from).

    >>> checkpoint_step("runs/wf/grpo/checkpoints/step_40")
    40
    """
    return int(Path(path).name.removeprefix("step_"))


def list_checkpoints(path: Path) -> list[Path]:
    """Complete checkpoints under `path`, oldest first."""
    if not path.exists():
        return []
    found = [p for p in path.iterdir() if re.fullmatch(r"step_\d+", p.name) and (p / "COMPLETE").exists()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(path: Path) -> Path | None:
    ckpts = list_checkpoints(path)
    return ckpts[-1] if ckpts else None


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metrics logged after `step` by a run that died before its next checkpoint."""
    f = out_dir / "metrics.jsonl"
    if f.exists():
        keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(f, "".join(ln + "\n" for ln in keep))
