"""The OPD student as a learner-group model: the distillation loss is computed inside its forward.

FSDP2 gathers a module's parameters for its forward; the loss needs the student's LM head (a root
parameter) beside the decoder's states, so `DistillStudent` wraps the Hugging Face model and its
forward returns the loss itself, the canonical way to use a sharded model. It also owns the
teacher heads (`HeadStore`: one resident at a time, read from the teachers' checkpoints).

Each rank streams the cache it wrote (`RankStep`); every row of a batch carries the loss weight of
its tokens (`rank_weights`, from the whole step's counts over all ranks), so the step's loss, a sum
of weighted divergences, is the same however the step is split into micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from distill.cache import CacheReader, step_samples
from distill.heads import HeadStore
from distill.loss import Balance, balance_weights, distill_loss

Batch = dict[str, torch.Tensor]


class DistillStudent(torch.nn.Module):
    """`inner` is the student (saved as a plain HF checkpoint); `forward(batch)` -> per-token divergence."""

    def __init__(self, inner: torch.nn.Module, teacher_paths: list[str]):
        super().__init__()
        self.inner = inner
        self.heads = HeadStore(teacher_paths)  # moved to the states' device at first use

    def forward(self, batch: Batch, divergence: str | None, temperature: float = 1.0, beta: float = 0.5,
                chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of weight * divergence over the batch's trained tokens [], each one's divergence [trained tokens])

        batch: input_ids, attention_mask [b, L] (right-padded), prompt_len [b], teacher [b] (one
        teacher per batch), teacher_hidden [b, R, H] and response_mask [b, R] (R: longest response;
        1 on trained tokens only), weight [b] (the loss weight of each of a row's trained tokens).
        With `divergence` None the student is a plain LM: each next token's log-prob at `temperature`,
        [b, L-1] (the weight-sync probe; under FSDP2 every forward must enter through this root module).
        """
        if divergence is None:
            from experts.grpo_loss import token_logprobs

            logits = self.inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            return token_logprobs(logits, batch["input_ids"][:, 1:], temperature)
        states = self.inner.get_decoder()(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).last_hidden_state
        rows = batch["response_mask"].bool()
        # the state at position t predicts token t + 1: response token j sits at prompt_len + j
        pos = batch["prompt_len"][:, None] - 1 + torch.arange(rows.shape[1], device=rows.device)[None, :]
        hs = states.gather(1, pos.clamp(max=states.shape[1] - 1)[..., None].expand(-1, -1, states.shape[-1]))[rows]
        teacher = int(batch["teacher"][0])
        self.heads.device = hs.device
        weights = batch["weight"][:, None].expand(rows.shape)[rows]
        out = distill_loss(hs, self.inner.get_output_embeddings().weight, batch["teacher_hidden"][rows],
                           self.heads.get(teacher), divergence=divergence, temperature=temperature, beta=beta,
                           chunk_size=chunk_size, weights=weights)
        return out.loss, out.per_token


def student_loader(path: str, dtype: torch.dtype, teacher_paths: list[str]) -> DistillStudent:
    """A learner loader (bind `teacher_paths` with functools.partial)."""
    from experts.models import load_model

    return DistillStudent(load_model(path, dtype), teacher_paths)


def opd_objective(model: DistillStudent, mb: Batch, *, divergence: str, temperature: float, beta: float,
                  chunk_size: int, domains: list[str], teachers: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
    """The learner objective: the weighted divergence sum (the batch's share of its step's loss; the
    group's denominator is 1), with per-domain and per-teacher sums and counts of the divergence."""
    loss_sum, per_token = model(mb, divergence, temperature, beta, chunk_size)
    sums: dict[str, float] = {}
    lens = mb["response_mask"].sum(1).tolist()
    for d, t, div in zip(mb["domain"].tolist(), mb["teacher"].tolist(), per_token.split([int(n) for n in lens])):
        for key in (f"domain/{domains[d]}", f"teacher/{teachers[t]}"):
            sums[f"sum/{key}"] = sums.get(f"sum/{key}", 0.0) + float(div.sum())
            sums[f"count/{key}"] = sums.get(f"count/{key}", 0.0) + len(div)
    return loss_sum, sums


def collate_teacher_batch(input_ids: list[torch.Tensor], prompt_lens: list[int], loss_masks: list[torch.Tensor],
                          hidden: torch.Tensor, teacher: int, domains: list[int], weights: list[float],
                          pad_id: int) -> Batch:
    """One cache batch (one teacher's samples) as right-padded tensors the group can split by row.

    loss_masks: each sample's [response_len] trained tokens; hidden: [trained tokens, H], sample
    after sample; weights: each sample's per-token loss weight.
    """
    b, width = len(input_ids), max(len(x) for x in input_ids)
    resp = [len(x) - p for x, p in zip(input_ids, prompt_lens)]
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    th = hidden.new_zeros((b, max(resp), hidden.shape[1]))
    rmask = torch.zeros((b, max(resp)), dtype=torch.long)
    row = 0
    for i, (x, n, m) in enumerate(zip(input_ids, resp, loss_masks)):
        ids[i, : len(x)], mask[i, : len(x)] = x, 1
        k = int(m.sum())
        rmask[i, :n] = m
        th[i, :n][m] = hidden[row : row + k]
        row += k
    return {"input_ids": ids, "attention_mask": mask, "prompt_len": torch.tensor(prompt_lens),
            "teacher_hidden": th, "response_mask": rmask, "teacher": torch.full((b,), teacher),
            "domain": torch.tensor(domains), "weight": torch.tensor(weights, dtype=torch.float64)}


def rank_weights(indexes: list[dict], step: int, balance: Balance) -> list[list[float]]:
    """Per rank, the loss weight of each trained token of each of its samples in step `step` (in the
    order its `RankStep` streams them), from the step's counts over every rank's cache index."""
    samples = [step_samples(ix, step) for ix in indexes]
    flat = balance_weights([s["domain"] for ss in samples for s in ss], [s["rows"][1] for ss in samples for s in ss],
                           balance)
    out, k = [], 0
    for ss in samples:
        out.append(flat[k : k + len(ss)])
        k += len(ss)
    return out


@dataclass
class RankStep:
    """One rank's micro-batches of one optimizer step, streamed from the cache that rank wrote.

    The driver hands each rank one of these (`WorkerGroup.train_step_ranks`); the rank reads its own
    shards of the step in teacher order (each verified, the next prefetched), one cache batch per
    micro-batch. Every rank must run `n` passes (FSDP's collectives), so a rank with fewer batches
    repeats its last one as padding (same teacher: no extra head read); a rank with none in this step
    pads with one dummy token of teacher `pad_teacher`.
    """

    root: str  # this rank's cache root
    round_id: int
    policy: str
    batch_tokens: int
    step: int
    n: int  # passes every rank makes this step: the most batches any rank has
    pad_id: int
    domains: list[str]
    pad_teacher: tuple[int, int]  # (teacher, its hidden size) for the dummy batch of a rank with no samples
    weights: list[float]  # loss weight of each token of each of this rank's samples of the step (`rank_weights`)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[Batch, bool]]:
        last, k, row = None, 0, 0
        if self.n:
            reader = CacheReader(self.root, self.round_id, policy=self.policy, batch_tokens=self.batch_tokens)
            for b in reader.batches(self.step):
                weights = self.weights[row : row + len(b.sample_ids)]
                if len(weights) != len(b.sample_ids):  # weights and stream come from the same index: a bug
                    raise ValueError(f"{self.root} step {self.step}: {len(self.weights)} weights for more samples")
                last = collate_teacher_batch(b.input_ids, b.prompt_lens, b.loss_masks, b.hidden, b.teacher,
                                             [self.domains.index(d) for d in b.domains], weights, self.pad_id)
                row += len(b.sample_ids)
                k += 1
                yield last, True
        if last is None and k < self.n:  # a dummy token of weight 0
            teacher, hidden = self.pad_teacher
            last = collate_teacher_batch([torch.tensor([self.pad_id, self.pad_id])], [1],
                                         [torch.ones(1, dtype=torch.bool)], torch.zeros(1, hidden), teacher, [0],
                                         [0.0], self.pad_id)
        for _ in range(self.n - k):
            yield last, False
