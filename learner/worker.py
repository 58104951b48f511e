"""One rank of a learner group: its shard of the model, its optimizer, and the steps it takes.

A plain class (the group wraps it in a Ray actor). Every rank of a group runs the same calls with
its own share of the batch; collectives inside FSDP2 or the gradient all-reduce keep them in step,
so every call is made on every rank, the same number of forward and backward passes each.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from learner.config import LearnerConfig
from learner.optim import Optim, check_finite, make_optimizer

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
# objective(model, micro_batch) -> (loss summed over the micro-batch's units, {metric: sum over them})
Objective = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
Loader = Callable[[str, torch.dtype], torch.nn.Module]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> str:
    """This node's address as Ray sees it (what other nodes reach it by), else the hostname's."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 -- outside Ray
        return socket.gethostbyname(socket.gethostname())


def layer_buckets(names: list[str], sizes: dict[str, int], bucket_bytes: int) -> list[list[str]]:
    """Parameter names in buckets of whole layers (what a name's first integer segment numbers; the
    embeddings before and the final norm and head after are groups of their own), consecutive layers
    merged while a bucket stays within `bucket_bytes` (a bigger layer is a bucket alone).

    >>> layer_buckets(["emb", "layers.0.a", "layers.0.b", "layers.1.a", "norm"], dict.fromkeys(
    ...     ["emb", "layers.0.a", "layers.0.b", "layers.1.a", "norm"], 10), 25)
    [['emb'], ['layers.0.a', 'layers.0.b'], ['layers.1.a', 'norm']]
    """
    groups: list[list[str]] = []
    key = None
    for n in names:
        k = next((p for p in n.split(".") if p.isdigit()), None)
        if not groups or k != key:
            groups.append([])
        groups[-1].append(n)
        key = k
    out: list[list[str]] = []
    size = 0
    for g in groups:
        b = sum(sizes[n] for n in g)
        if out and size + b <= bucket_bytes:
            out[-1] += g
            size += b
        else:
            out.append(list(g))
            size = b
    return out


def _send(targets: list, method: str, *args) -> None:
    """`method(*args)` on every target, Ray actors in parallel (a bucket is put in the object store once)."""
    import ray

    actors = [t for t in targets if isinstance(t, ray.actor.ActorHandle)]
    if actors:
        refs = [ray.put(a) for a in args]
        ray.get([getattr(t, method).remote(*refs) for t in actors])
    for t in targets:
        if t not in actors:
            getattr(t, method)(*args)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one: HF names their class in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names or type(m).__name__.endswith("DecoderLayer")]
    return [m for m in layers if m is not model]


class LearnerWorker:
    """One rank. `setup` joins the process group, loads and shards the model and builds the optimizer."""

    def address(self) -> tuple[str, int]:
        """(node address, a free port): rank 0's answer is where the group meets."""
        return node_address(), free_port()

    def setup(self, rank: int, world: int, addr: str, port: int, model_path: str, cfg: LearnerConfig,
              optim: Optim | None, loader: Loader, resume: str | None = None) -> int:
        """Join the group, load `model_path` (then `resume`'s sharded state, if given); returns the step."""
        self.rank, self.world, self.cfg, self.optim = rank, world, cfg, optim
        cuda = cfg.gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        torch.set_num_threads(cfg.threads or max(1, int(cfg.cpus_per_worker)))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{addr}:{port}", rank=rank,
                                    world_size=world, timeout=datetime.timedelta(seconds=cfg.collective_timeout_s))
        dtype = getattr(torch, cfg.dtype)
        model = loader(model_path, dtype).to(self.device)
        if cfg.activation_checkpointing:
            inner = getattr(model, "inner", model)  # a loss-computing wrapper keeps the HF model there
            if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5
                inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:  # before sharding: FSDP2 shards the adapters with their layer
            from learner.lora import add_adapters

            add_adapters(model, cfg.lora)
        self.model = self._shard(model)
        self.opt = self.sched = None
        if optim is not None:
            self.opt, self.sched = make_optimizer(self.model, optim)
        self.step = 0
        if resume is not None:
            from learner.checkpoint import load_sharded

            self.step = load_sharded(Path(resume), self.model, self.opt, self.sched, trainable_only=self.lora)
        return self.step

    @property
    def lora(self) -> bool:
        return self.cfg.lora is not None

    def _merged(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` under the base model's names, LoRA adapters merged in (as is without LoRA)."""
        if not self.lora:
            return state
        from learner.lora import merge_adapters

        return merge_adapters(state, self.cfg.lora.scale)

    @property
    def sharded(self) -> bool:
        """FSDP2 with someone to shard with, or for its bf16 compute on a GPU. One CPU rank keeps plain
        tensors: FSDP2's hooks and DTensors cost it a tenth of a train step and buy nothing."""
        mixed = self.cfg.mixed_precision and self.device.type == "cuda"
        return self.cfg.strategy == "fsdp2" and (self.world > 1 or mixed)

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.sharded:
            # DDP, or one unsharded rank. Replicas start equal (rank 0's weights), and gradients are averaged
            # in `_reduce_grads`: no DDP wrapper, so objectives may call any submodule, not only forward().
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy()
        if self.cfg.mixed_precision and self.device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model

    # -- steps ---------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[tuple[Batch, bool]], objective: Objective, denominator: float,
                   label: str) -> dict[str, Any]:
        """One optimizer step: backward `objective` over this rank's micro-batches, then clip and step.

        `denominator` is the whole (all ranks') batch's count of loss units (tokens, sequences,
        pairs), so the update is sum(loss) / denominator whatever the split. Ranks average their
        gradients, so each rank's loss is scaled by world / denominator. A micro-batch marked
        False is padding (ranks must run the same number of passes): its loss counts zero.
        Returns this rank's metric sums (maxima for keys starting `max/`); the group adds (or maxes) the ranks'.
        """
        self.model.train()
        scale = self.world / max(denominator, 1e-12)
        sums: dict[str, float] = {"loss": 0.0}
        for i, (mb, real) in enumerate(micro_batches):
            self._sync_grads(last=i == len(micro_batches) - 1)
            loss_sum, metrics = objective(self.model, self._to_device(mb))
            (loss_sum * (scale if real else 0.0)).backward()
            if real:
                sums["loss"] += float(loss_sum.detach())
                for k, v in metrics.items():
                    sums[k] = max(sums.get(k, v), float(v)) if k.startswith("max/") else sums.get(k, 0.0) + float(v)
        self._reduce_grads()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        check_finite(label, loss=sums["loss"], grad_norm=grad_norm)  # every rank sees the same grad norm
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"sums": sums, "grad_norm": grad_norm, "lr": lr, "step": self.step}

    @torch.no_grad()
    def forward(self, micro_batches: list[tuple[Batch, bool]], fn: Callable[[torch.nn.Module, Batch], torch.Tensor]
                ) -> list[torch.Tensor]:
        """`fn(model, micro_batch)` on each micro-batch (no gradients), results on the CPU; padding dropped."""
        self.model.eval()
        out = [fn(self.model, self._to_device(mb)).cpu() for mb, _ in micro_batches]
        return [o for o, (_, real) in zip(out, micro_batches) if real]

    def apply(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """`fn(model)` on this rank (e.g. release a cache the model holds); must not run collectives."""
        return fn(self.model)

    def _to_device(self, mb: Batch) -> Batch:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}

    def _sync_grads(self, last: bool) -> None:
        if self.sharded:  # reduce-scatter once, after the last micro-batch
            self.model.set_requires_gradient_sync(last)

    def _reduce_grads(self) -> None:
        if self.cfg.strategy != "ddp" or self.world == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:  # one flat all-reduce, not one per tensor
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, op=dist.ReduceOp.AVG if flat.is_cuda else dist.ReduceOp.SUM)
            if not flat.is_cuda:  # gloo has no AVG
                flat.div_(self.world)
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)

    # -- state ---------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model in HF names on rank 0 (gathered; every rank must call), None elsewhere; LoRA merged."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        prefix = "inner." if hasattr(self.model, "inner") else ""  # a loss-computing wrapper keeps the HF model there
        return self._merged({k.removeprefix(prefix): v for k, v in sd.items()})

    def push_weights(self, targets: list, bucket_bytes: int) -> dict[str, int]:
        """Stream the model to rollout `targets` in HF names, whole decoder layers per bucket.

        Every rank must call: each parameter is gathered (FSDP2's all-gather) on every rank in the same
        order, and rank 0 sends each bucket as soon as it is full, so only one bucket is ever held or
        in flight (never a whole model). A target is a Ray actor or a plain object with `load_bucket`
        and `finish_sync` (a local rollout worker). With LoRA each bucket is merged before it goes (a
        bucket holds whole layers, adapters with their base weights): targets get plain HF weights.
        """
        prefix = "inner." if hasattr(self.model, "inner") else ""
        state = self.model.state_dict()  # DTensor shards under FSDP2: gathered one at a time below
        seen: set[int] = set()
        for k in list(state):  # tied weights (lm_head = embed_tokens) go once, under their first name
            local = state[k].to_local() if hasattr(state[k], "to_local") else state[k]
            if local.numel() and local.data_ptr() in seen:
                del state[k]
            seen.add(local.data_ptr())
        sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
        sent = buckets = 0
        for names in layer_buckets(list(state), sizes, bucket_bytes):
            bucket = {}
            for k in names:
                t = state[k]
                full = t.full_tensor() if hasattr(t, "full_tensor") else t
                if self.rank == 0:
                    bucket[k.removeprefix(prefix)] = full.detach().to("cpu")
            if self.rank == 0:
                bucket = self._merged(bucket)
                _send(targets, "load_bucket", bucket)
                sent += sum(v.numel() * v.element_size() for v in bucket.values())
                buckets += 1
        if self.rank == 0:
            _send(targets, "finish_sync")
        return {"sync/buckets": buckets, "sync/bytes": sent}

    def full_state_dict_ref(self) -> list | None:
        """[ObjectRef of `full_state_dict()`] from rank 0 (a list, so Ray hands back the reference)."""
        import ray

        sd = self.full_state_dict()
        return [ray.put(sd)] if sd is not None else None

    def save_hf(self, path: str, tokenizer_path: str) -> str | None:
        """Write a full (gathered) Hugging Face checkpoint at `path` from rank 0; every rank must call."""
        sd = self.full_state_dict()
        if self.rank != 0:
            return None
        from experts.models import load_tokenizer
        from pipeline.context import atomic_dir

        with atomic_dir(Path(path)) as tmp:
            getattr(self.model, "inner", self.model).save_pretrained(tmp, state_dict=sd, safe_serialization=True)
            load_tokenizer(tokenizer_path).save_pretrained(tmp)
        return path

    def save_sharded(self, path: str) -> None:
        """Resumable checkpoint: each rank writes its shards; rank 0 the step count, schedule and RNG."""
        from learner.checkpoint import save_sharded

        save_sharded(Path(path), self.model, self.opt, self.sched, {"step": self.step}, self.rank,
                     trainable_only=self.lora)

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds of parameters and of optimizer state (its shards only, under FSDP2)."""
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 -- a DTensor's own shard
        params = sum(local(p).numel() * local(p).element_size() for p in self.model.parameters())
        opt = sum(local(v).numel() * local(v).element_size() for st in (self.opt.state.values() if self.opt else [])
                  for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        return {"params": params, "optimizer": opt}

    def get_step(self) -> int:
        return self.step

    def node(self) -> str:
        """Where this rank runs, for logs and errors: address, Ray node id, pid."""
        import ray

        return f"{node_address()} node {ray.get_runtime_context().get_node_id()[:8]} (pid {os.getpid()})"

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
