"""The teachers' half of a round: each teacher in turn encodes the student's samples into the cache.

The forward is spread over the student's learner ranks: each rank encodes its share of every
teacher's samples, teacher after teacher (one teacher model beside its student shard at a time),
into a cache of its own, which the same rank then trains on. Teachers may live in remote storage
(any fsspec URL); the stage copies them to a local directory for the round.

The student's half (sampling) is the one rollout (`rollout.worker`), on HF or vLLM like GRPO's.
"""

from __future__ import annotations

import gc
import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import fsspec
import torch
from tqdm import tqdm

from distill.cache import CacheWriter, prune_rounds
from distill.loss import distill_loss
from experts.models import load_model
from learner.batching import split_by_tokens
from rollout.types import Rollout

log = logging.getLogger(__name__)

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")  # what `fetch_model(weights=False)` leaves behind


def is_url(ref: str) -> bool:
    """A model reference with a scheme (`s3://b/m`, `gs://...`, `file:///x`, `memory://x`): fetched, not opened."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", ref) is not None


def fetch_model(url: str, dest: Path, weights: bool = True) -> Path:
    """Copy the checkpoint directory at fsspec `url` to `dest` (replacing it) and return `dest`.

    `weights=False` copies only the small files (config, tokenizer): enough to check a tokenizer
    without pulling gigabytes. The copy is made beside `dest` and renamed into place.
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    files = [f for f in fs.find(root) if f.startswith(root + "/")]
    if not files:
        raise FileNotFoundError(f"{url}: no files there (expected a Hugging Face checkpoint directory)")
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in files:
        rel = f[len(root) + 1 :]
        if not weights and rel.endswith(WEIGHT_FILES):
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f, str(tmp / rel))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def rank_root(cache_root: str, rank: int) -> str:
    """Where rank `rank` writes (and later reads) its share of every round's cache."""
    return f"{cache_root.rstrip('/')}/rank_{rank:05d}"


def split_groups(groups: dict[tuple[int, int], list[Rollout]], world: int) -> list[dict[tuple[int, int], list[Rollout]]]:
    """Each (teacher, step) group's rollouts split over `world` ranks, balanced by tokens: every rank
    gets a share of every group, so each writes shards of every teacher and trains on every domain."""
    out: list[dict] = [{} for _ in range(world)]
    for key, rollouts in groups.items():
        tokens = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
        for rank, rows in enumerate(split_by_tokens(tokens, world)):
            if rows:
                out[rank][key] = [rollouts[i] for i in rows]
    return out


def response_hidden(model, input_ids: list[torch.Tensor], prompt_lens: list[int], pad_id: int) -> torch.Tensor:
    """Last-layer states (after the final norm) at the positions that predict each response token.

    input_ids: per sample [prompt_len + response_len]; returns [sum of response lens, hidden], sample
    after sample. Sequences are right-padded, so positions start at 0 exactly as in generation and
    the causal mask keeps padding out of every kept position.
    """
    device = next(model.parameters()).device
    width = max(len(ids) for ids in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for j, seq in enumerate(input_ids):
        ids[j, : len(seq)] = seq.to(device)
        mask[j, : len(seq)] = 1
    states = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # [batch, width, hidden]
    # the state at position t predicts token t + 1: response tokens p..n-1 come from states p-1..n-2
    return torch.cat([states[j, p - 1 : len(seq) - 1] for j, (seq, p) in enumerate(zip(input_ids, prompt_lens))])


def write_teacher_cache(
    groups: dict[tuple[int, int], list[Rollout]],  # (teacher, step) -> that teacher's rollouts of that step
    teacher_paths: list[Path],
    writer: CacheWriter,
    pad_id: int,
    load: Callable[[Path], torch.nn.Module],
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> None:
    """Load each teacher in turn, encode its rollouts, append the states of their trained tokens to the
    cache, free it.

    The teacher reads each whole sequence (an agent episode's tool results included: they are its
    context too) and the cache keeps its states only where the rollout's `loss_mask` is 1, the
    tokens the student sampled. Only one teacher model is in memory at a time; teachers with no
    rollouts are never loaded.
    """
    for t in sorted({t for t, _ in groups}):
        model = load(teacher_paths[t]).to(device).eval()
        n = 0
        # one bar per teacher, gone when it is done: a round's forward is a step inside OPD's round bar
        bar = tqdm(total=sum(len(v) for (tt, _), v in groups.items() if tt == t), desc=f"teacher {t} forward",
                   unit="seq", mininterval=2.0, leave=False)
        with torch.inference_mode(), bar:
            for step in sorted(s for tt, s in groups if tt == t):
                rollouts = groups[(t, step)]
                for i in range(0, len(rollouts), batch_size):
                    chunk = rollouts[i : i + batch_size]
                    seqs = [torch.tensor(r.prompt_ids + r.response_ids) for r in chunk]
                    lens = [len(r.prompt_ids) for r in chunk]
                    states = response_hidden(model, seqs, lens, pad_id)
                    row = 0
                    for r, seq, p in zip(chunk, seqs, lens):
                        k = len(seq) - p
                        trained = torch.tensor(r.loss_mask, dtype=torch.bool, device=states.device)
                        writer.add(t, r.sample_id, r.domain, seq.tolist(), p, states[row : row + k][trained],
                                   step=step, loss_mask=r.loss_mask)
                        row += k
                    bar.update(len(chunk))
                n += len(rollouts)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("teacher %d (%s): cached %d samples", t, teacher_paths[t], n)


@torch.no_grad()
def on_policy_kl(student, teacher, tokenizer, samples: list[dict], max_new_tokens: int = 16, seed: int = 0,
                 divergence: str = "reverse_kl") -> float:
    """Mean per-token KL(student || teacher) over the tokens the student samples for `samples`
    (a forced `</think>` is not the student's: left out, as in training).

    The measure OPD minimises, taken on held-out prompts to show the student moving toward a teacher.
    """
    from rollout.backends import HFBackend
    from rollout.config import RolloutConfig
    from rollout.worker import sample

    cfg = RolloutConfig(group_size=1, max_new_tokens=max_new_tokens, temperature=1.0, reasoning="think")
    torch.manual_seed(seed)
    rollouts = sample(HFBackend(student, tokenizer.pad_token_id, cfg), tokenizer, samples, cfg)
    seqs = [torch.tensor(r.prompt_ids + r.response_ids) for r in rollouts]
    lens = [len(r.prompt_ids) for r in rollouts]
    hs = response_hidden(student, seqs, lens, tokenizer.pad_token_id)
    ht = response_hidden(teacher, seqs, lens, tokenizer.pad_token_id)
    mask = torch.tensor([m for r in rollouts for m in r.loss_mask], dtype=torch.bool, device=hs.device)
    out = distill_loss(hs, student.get_output_embeddings().weight, ht, teacher.get_output_embeddings().weight,
                       mask, divergence=divergence)
    return out.loss.item()


def rank_teacher_forward(student, shares: list[dict[tuple[int, int], list[Rollout]]], teacher_paths: list[str],
                         cache_root: str, round_id: int, teachers: list[dict], policy: str, dtype: torch.dtype,
                         shard_rows: int, pad_id: int, batch_size: int) -> dict:
    """On one learner rank (`WorkerGroup.apply`): encode this rank's share with each teacher in turn,
    on the rank's device, into this rank's cache; returns the round's index (what the rank wrote).

    `student` is the rank's model, used only for its device and dtype (`learner.dtype`: a teacher loads
    in the student's dtype); the teachers never touch it.
    """
    import functools

    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    param = next(student.parameters())
    writer = CacheWriter(rank_root(cache_root, rank), round_id, teachers, policy=policy, dtype=dtype,
                         shard_rows=shard_rows)
    write_teacher_cache(shares[rank], [Path(p) for p in teacher_paths], writer, pad_id,
                        functools.partial(load_model, dtype=param.dtype), batch_size, param.device)
    return writer.close()


def rank_prune(_student, cache_root: str, keep: int) -> list[int]:
    """On one learner rank: keep only the newest `keep` rounds of this rank's cache."""
    import torch.distributed as dist

    return prune_rounds(rank_root(cache_root, dist.get_rank() if dist.is_initialized() else 0), keep)
