"""Weight sync: the learner group's weights into every rollout engine, then a probe that proves it.

The learner's ranks gather the model one parameter at a time and rank 0 streams it, whole decoder
layers per bucket, in Hugging Face names, to every rollout worker (`WorkerGroup.push_weights`): the
HF backend copies the tensors in place, the vLLM backend hands them to its engine process through
the worker extension (`rollout.vllm_ext`). Then learner and engines score the same probe prompts at
temperature 1 (vLLM never tempers prompt log-probs), and a mean gap above the backend's tolerance
fails the stage: rollouts from stale weights would train on someone else's policy.
"""

from __future__ import annotations

import time

import torch

from experts.grpo_loss import next_token_logprobs
from learner.batching import pad_rows
from learner.group import WorkerGroup
from pipeline.config import StageFailed
from rollout.worker import call


def learner_logprobs(group: WorkerGroup, rows: list[list[int]], micro_batch_size: int = 16) -> list[list[float]]:
    """Teacher-forced log-probs (temperature 1) of each row's tokens 1..n, on the learner group."""
    lp = group.forward(pad_rows(rows), next_token_logprobs, micro_batch_size)
    return [lp[i, : len(r) - 1].tolist() for i, r in enumerate(rows)]


def probe_gap(want: list[list[float]], got: list[list[float]]) -> float:
    """Mean |difference| of two engines' log-probs for the same probe tokens."""
    a = torch.tensor([x for row in want for x in row])
    b = torch.tensor([x for row in got for x in row])
    return float((a - b).abs().mean())


def sync_weights(group: WorkerGroup, workers: list, probe: list[list[int]], bucket_mb: float = 256,
                 check: bool = True) -> dict[str, float]:
    """Push `group`'s weights to every rollout worker; with `check`, prove they arrived (StageFailed if not)."""
    start = time.perf_counter()
    m = group.push_weights(workers, bucket_mb)
    m["sync/seconds"] = time.perf_counter() - start
    if check:
        want = learner_logprobs(group, probe)
        tols = call(workers, "sync_tolerance")
        gaps = [probe_gap(want, got) for got in call(workers, "prompt_logprobs", probe)]
        m["sync/probe_logp_gap"] = max(gaps)
        for i, (gap, tol) in enumerate(zip(gaps, tols)):  # each worker's: rollout.sync_tolerance or its backend's
            if gap > tol:
                raise StageFailed(f"rollout worker {i} has stale weights: probe log-probs differ from the learner's "
                                  f"by {gap:.3g} (tolerance {tol:g}); the weight sync did not take")
    return m
