"""Which rows each step trains on, and how a step's batch is split over ranks and micro-batches."""

from __future__ import annotations

import heapq
import random

import torch

Batch = dict[str, torch.Tensor]


def batch_plan(n_rows: int, per_step: int, steps: int, seed: int) -> list[list[int]]:
    """Row indices for every step: shuffled epochs back to back, fixed by `seed` (so resumable).

    >>> batch_plan(3, 2, 3, seed=0)
    [[0, 2], [1, 2], [1, 0]]
    """
    if n_rows == 0 and steps * per_step > 0:
        raise ValueError(f"no rows to plan {steps} steps of {per_step} from")
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * per_step:
        epoch = list(range(n_rows))
        rng.shuffle(epoch)
        order.extend(epoch)
    return [order[s * per_step : (s + 1) * per_step] for s in range(steps)]


def mixed_plan(groups: list[list[int]], shares: list[float], per_step: int, steps: int, seed: int) -> list[list[int]]:
    """Row indices for every step, each group (say, a domain's rows) taking its share of all rows drawn.

    Slot after slot, the group furthest behind its share (`share * slots so far - rows it got`)
    takes the next one, so every prefix of the run holds each group's share to within one row, and
    a share smaller than one row per step still gets its rows (every few steps). Each group is
    walked in its own shuffled epochs (`batch_plan`), so a small domain repeats rather than
    vanishing from a mix dominated by a large one.

    >>> mixed_plan([[0, 1, 2, 3], [4, 5]], [3, 1], per_step=4, steps=2, seed=0)
    [[2, 0, 1, 5], [3, 0, 1, 4]]
    >>> [len(step) for step in mixed_plan([[0], [1]], [0.9, 0.1], per_step=2, steps=10, seed=0)]
    [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    """
    total = sum(shares)
    counts = [0] * len(groups)
    per_group_step: list[list[int]] = []  # [step][group] -> rows of the group in the step
    for step in range(steps):
        now = [0] * len(groups)
        for slot in range(step * per_step, (step + 1) * per_step):
            g = max(range(len(groups)), key=lambda g: (shares[g] / total * (slot + 1) - counts[g], -g))
            counts[g] += 1
            now[g] += 1
        per_group_step.append(now)
    orders = [iter(i for step in batch_plan(len(rows), 1, counts[g], seed + g) for i in step) if counts[g] else iter(())
              for g, rows in enumerate(groups)]
    return [[groups[g][next(orders[g])] for g in range(len(groups)) for _ in range(now[g])] for now in per_group_step]


def row_tokens(batch: Batch) -> list[int]:
    """Tokens per row: its attention mask's sum (over every sequence of the row, e.g. [pairs, 2, L]),
    else the row's size."""
    t = batch["attention_mask"] if "attention_mask" in batch else batch["input_ids"]
    per_row = t.flatten(1).sum(1) if "attention_mask" in batch else torch.full((t.shape[0],), t[0].numel())
    return per_row.tolist()


def split_by_tokens(tokens: list[int], parts: int) -> list[list[int]]:
    """Row indices for each of `parts` ranks, balancing tokens (longest row first to the lightest rank).

    >>> split_by_tokens([10, 1, 1, 8, 2], 2)
    [[0, 1], [2, 3, 4]]
    """
    heap = [(0, 0, p) for p in range(parts)]  # (tokens, rows, rank)
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        load, rows, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (load + tokens[i], rows + 1, p))
    return [sorted(rows) for rows in out]


# Right-padded token tensors whose all-padding columns a micro-batch may drop: [B, L] ones, and
# [B, L-1] ones that score next tokens. Any other tensor is taken whole.
TOKEN_KEYS = {"input_ids": 0, "attention_mask": 0, "labels": 0,
              "loss_mask": 1, "rollout_logp": 1, "old_logp": 1, "ref_logp": 1}


def take(batch: Batch, rows: list[int]) -> Batch:
    """Rows `rows` of every [B, ...] tensor; TOKEN_KEYS tensors lose the columns that are padding in all of them."""
    idx = torch.tensor(rows, dtype=torch.long)
    out = {k: v[idx] for k, v in batch.items()}
    mask = out.get("attention_mask")
    if mask is not None and mask.dim() == 2 and len(rows):
        keep = int(mask.sum(0).nonzero().max()) + 1 if mask.any() else 1
        for k, short in TOKEN_KEYS.items():
            if k in out:
                out[k] = out[k][:, : keep - short]
    return out


def rank_micro_batches(batch: Batch, world: int, micro: int) -> tuple[list[list[tuple[Batch, bool]]], list[list[int]]]:
    """Split `batch` over `world` ranks by tokens, then each rank's rows into micro-batches of `micro`.

    Every rank gets the same number of micro-batches (FSDP's collectives need every rank in every
    pass): a rank that is short gets padding micro-batches, marked False, whose loss counts zero.
    Returns (per rank [(micro_batch, real)], per rank the row indices in the order they come back).
    """
    parts = split_by_tokens(row_tokens(batch), world)
    chunks = [[rows[i : i + micro] for i in range(0, len(rows), micro)] for rows in parts]
    n = max(1, max(len(c) for c in chunks))
    out = []
    for c in chunks:
        real = [(take(batch, rows), True) for rows in c]
        pad = take(batch, c[0] if c else [0])
        out.append(real + [(pad, False)] * (n - len(real)))
    return out, parts


def pad_rows(rows: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask of token rows.

    >>> pad_rows([[5, 6, 7], [8]], pad_id=0)["input_ids"].tolist()
    [[5, 6, 7], [8, 0, 0]]
    """
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask}
