"""`WorkerGroup`: the stage's handle on its learner ranks, as one object with one step at a time.

The stage (the single controller) calls `train_step(batch, objective, denominator)`,
`forward(batch, fn)`, `save(...)`, `save_hf(...)`; the group splits each batch over ranks
balanced by tokens, runs the call on every rank and adds up what comes back. A rank that dies
fails the call at once with one line naming it and its node (the other ranks are killed rather
than left waiting in a collective); a group the cluster cannot hold fails before anything starts.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.batching import Batch, rank_micro_batches
from learner.checkpoint import finish
from learner.config import LearnerConfig
from learner.optim import Optim
from learner.worker import LearnerWorker, Loader, Objective
from pipeline.config import StageFailed, UserError

log = logging.getLogger(__name__)
PLACEMENT_TIMEOUT_S = 120


class WorkerFailed(StageFailed):
    """A learner rank died or broke mid-call; names the rank and its node."""


def default_loader(path: str, dtype: torch.dtype) -> torch.nn.Module:
    from experts.models import load_model

    return load_model(path, dtype)


class WorkerGroup:
    """`cfg.workers` LearnerWorker actors in one placement group, joined by torch.distributed."""

    def __init__(self, model_path: str, cfg: LearnerConfig, optim: Optim | None = None, *,
                 loader: Loader = default_loader, resume: str | None = None, name: str = "learner",
                 local: bool = False):
        """`local=True` runs one rank in this very process, without Ray (tests, benchmarks, notebooks):
        the same LearnerWorker and batching, called directly."""
        self.cfg, self.name, self.model_path, self.local = cfg, name, str(model_path), local
        self.pg = None
        if cfg.lora is not None and loader is not default_loader:
            # A stage with its own loader (OPD's student, the reward model's scorer) trains parts LoRA would
            # freeze (a head) or computes its loss around the model: it trains its model whole.
            raise UserError(f"{name}: learner.lora is for sft and grpo; this stage trains its whole model "
                            f"(remove learner.lora)")
        if local:
            if cfg.workers != 1:
                raise UserError(f"{name}: a local learner runs one worker in this process; learner.workers is {cfg.workers}")
            from learner.worker import free_port

            self.workers, self.nodes = [LearnerWorker()], ["rank 0 (this process)"]
            self.step = self.workers[0].setup(0, 1, "127.0.0.1", free_port(), self.model_path, cfg, optim, loader, resume)
            return
        self._check_resources()
        bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
        self.pg = placement_group([bundle] * cfg.workers, strategy="STRICT_SPREAD" if cfg.placement == "spread" else "PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(self.pg)
            raise UserError(f"{name}: learner {cfg.workers} x {bundle} ({cfg.placement}) could not be placed within "
                            f"{PLACEMENT_TIMEOUT_S}s; the cluster has {ray.available_resources()} free")
        actor = ray.remote(LearnerWorker)
        self.workers = [actor.options(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, name=None,
                                      scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i)).remote()
                        for i in range(cfg.workers)]
        self.nodes = [f"rank {i}" for i in range(cfg.workers)]  # names errors until the nodes are known
        self.nodes = [f"rank {i} on {n}" for i, n in enumerate(self._call("node"))]
        addr, port = ray.get(self.workers[0].address.remote())
        steps = self._call("setup", per_rank=[(r, cfg.workers, addr, port, self.model_path, cfg, optim, loader, resume)
                                              for r in range(cfg.workers)])
        self.step = steps[0]
        log.info("%s: %d worker(s), %s, %s: %s", name, cfg.workers, cfg.strategy, cfg.dtype, ", ".join(self.nodes))

    def _check_resources(self) -> None:
        total = ray.cluster_resources()
        for what, each in (("CPU", self.cfg.cpus_per_worker), ("GPU", self.cfg.gpus_per_worker)):
            need = each * self.cfg.workers
            if need > total.get(what, 0):
                raise UserError(f"{self.name}: learner asks for {self.cfg.workers} workers x {each:g} {what} = "
                                f"{need:g} {what}, but the cluster has {total.get(what, 0):g}")
        if self.cfg.placement == "spread":
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            if nodes < self.cfg.workers:
                raise UserError(f"{self.name}: learner placement 'spread' puts one worker per node: "
                                f"{self.cfg.workers} workers, but the cluster has {nodes} node(s)")

    # -- calls ---------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, per_rank: list[tuple] | None = None) -> list[Any]:
        """`method` on every rank; the results in rank order. A dead rank fails the call at once."""
        if self.local:
            return [getattr(self.workers[0], method)(*(per_rank[0] if per_rank else args))]
        futures = [getattr(w, method).remote(*(per_rank[i] if per_rank else args)) for i, w in enumerate(self.workers)]
        rank_of = {f: i for i, f in enumerate(futures)}
        pending, results = list(futures), {}
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            f = done[0]
            try:
                results[rank_of[f]] = ray.get(f)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                self.close()
                raise WorkerFailed(f"{self.name} {self.nodes[rank_of[f]]} died during {method} "
                                   f"({type(e).__name__}); rerun to resume from the last checkpoint") from None
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, UserError):
                    self.close()
                    raise e.cause from None
                # A rank whose peer was killed fails first, with a broken collective: name the dead one.
                dead = self._dead_rank(pending, rank_of)
                self.close()
                failed = f"{self.nodes[rank_of[f]]} failed during {method}: {type(e.cause).__name__}: {e.cause}"
                if dead is not None:
                    raise WorkerFailed(f"{self.name} {self.nodes[dead]} died during {method} (and {failed}); "
                                       f"rerun to resume from the last checkpoint") from None
                raise WorkerFailed(f"{self.name} {failed}") from None
        return [results[i] for i in range(len(futures))]

    def _dead_rank(self, pending: list, rank_of: dict, grace_s: float = 10.0) -> int | None:
        """The first of the still-running ranks whose process died, waiting up to `grace_s` for Ray
        to notice; None if they all live."""
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=grace_s)
        for f in done:
            try:
                ray.get(f)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                return rank_of[f]
            except ray.exceptions.RayTaskError:
                pass
        return None

    def train_step(self, batch: Batch | list[Batch], objective: Objective, denominator: float, micro_batch_size: int,
                   label: str | None = None) -> dict[str, float]:
        """One optimizer step on `batch` (all ranks' rows): sum(loss) / denominator, clipped.

        A list of batches is one step over all of them, in order, each split over the ranks (OPD
        passes one batch per teacher, so each rank walks the teachers in order). Returns the metric
        sums over everything (`loss` and whatever `objective` reports; keys starting `max/` are maxima), plus `grad_norm` and `lr`.
        """
        per_rank = [[] for _ in range(self.cfg.workers)]
        for part in batch if isinstance(batch, list) else [batch]:
            for mine, mbs in zip(per_rank, rank_micro_batches(part, self.cfg.workers, micro_batch_size)[0]):
                mine.extend(mbs)
        return self.train_step_ranks(per_rank, objective, denominator, label)

    def train_step_ranks(self, per_rank: list, objective: Objective, denominator: float,
                         label: str | None = None) -> dict[str, float]:
        """`train_step` where each rank brings its own micro-batches: `per_rank[i]` is rank i's sequence of
        (micro_batch, real), the same length on every rank (e.g. a lazy stream of files that rank wrote)."""
        label = label or f"step {self.step + 1}"
        outs = self._call("train_step", per_rank=[(mbs, objective, denominator, label) for mbs in per_rank])
        sums: dict[str, float] = {}
        for o in outs:
            for k, v in o["sums"].items():
                sums[k] = max(sums.get(k, v), v) if k.startswith("max/") else sums.get(k, 0.0) + v
        self.step = outs[0]["step"]
        return {**sums, "grad_norm": outs[0]["grad_norm"], "lr": outs[0]["lr"]}

    def forward(self, batch: Batch, fn, micro_batch_size: int) -> torch.Tensor:
        """`fn(model, micro_batch) -> [rows, ...]` over every row of `batch`, back in the batch's row order.

        Results of different micro-batches may differ in width (their padding is cut): they are
        right-padded with zeros to the batch's widest.
        """
        per_rank, parts = rank_micro_batches(batch, self.cfg.workers, micro_batch_size)
        outs = self._call("forward", per_rank=[(mbs, fn) for mbs in per_rank])
        pieces = [(rows, t) for rank_rows, rank_outs in zip(parts, outs)
                  for rows, t in zip(_chunks(rank_rows, micro_batch_size), rank_outs)]
        if not pieces:
            return torch.zeros(0)
        width = max(t.shape[1] for _, t in pieces) if pieces[0][1].dim() > 1 else None
        n = sum(len(rows) for rows, _ in pieces)
        out = pieces[0][1].new_zeros((n, width, *pieces[0][1].shape[2:]) if width is not None else (n,))
        for rows, t in pieces:
            if width is None:
                out[rows] = t
            else:
                out[rows, : t.shape[1]] = t
        return out

    def apply(self, fn) -> list[Any]:
        """`fn(model)` on every rank (no collectives inside); the results in rank order."""
        return self._call("apply", fn)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model in HF names, here in the driver (a copy: for a driver-side sampler)."""
        sd = self.full_state_dict()
        return ray.get(sd) if isinstance(sd, ray.ObjectRef) else sd

    def full_state_dict(self) -> ray.ObjectRef:
        """A reference to the whole model in HF names (gathered on rank 0), put in the object store
        once by rank 0; rollout workers fetch it from there, the driver never holds a copy."""
        if self.local:  # a snapshot: on one CPU rank the gathered tensors can share the live weights' memory
            return {k: v.clone() for k, v in self.workers[0].full_state_dict().items()}
        return self._call("full_state_dict_ref")[0][0]

    def push_weights(self, targets: list, bucket_mb: float = 256) -> dict[str, int]:
        """Stream the current weights to rollout `targets` (Ray actors or local objects with
        `load_bucket` / `finish_sync`), whole layers per bucket of about `bucket_mb` MiB."""
        return self._call("push_weights", targets, int(bucket_mb * 2**20))[0]

    def save(self, checkpoint_dir: Path, step: int, keep: int) -> Path:
        """Resumable sharded checkpoint `checkpoint_dir/step_<step>` (the stage's step: a resumed stage
        starts after it); only the newest `keep` stay."""
        final = Path(checkpoint_dir) / f"step_{step}"
        tmp = final.with_name(f".{final.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self._call("save_sharded", str(tmp))
        return finish(tmp, final, step, keep)

    def save_hf(self, path: Path, tokenizer_path: str) -> Path:
        """A full, gathered Hugging Face checkpoint at `path` (AutoModelForCausalLM loads it)."""
        self._call("save_hf", str(path), str(tokenizer_path))
        return Path(path)

    def state_bytes(self) -> list[dict[str, int]]:
        """Bytes of parameters and optimizer state each rank holds (its shards), in rank order."""
        return self._call("state_bytes")

    def close(self) -> None:
        if self.local:
            return  # the process group of a local rank lives as long as the process
        for w in getattr(self, "workers", []):
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 -- already dead
                pass
        self.workers = []
        if getattr(self, "pg", None) is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            self.pg = None


def _chunks(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]
