"""A learner group of 2 workers takes the very step 1 worker takes, and fails loudly, never hangs."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch

from experts import sft
from experts.data import DataConfig, load_samples
from experts.models import load_model, load_tokenizer
from learner.config import LearnerConfig
from learner.group import WorkerFailed, WorkerGroup
from pipeline.config import UserError
from tests.conftest import ARITH


@pytest.fixture
def ray_cluster(ray_session):
    if ray.cluster_resources().get("CPU", 0) < 2:
        pytest.skip("needs 2 CPUs in the embedded Ray")
    return ray_session


def sft_rows(base, n=12):
    tok = load_tokenizer(base)
    return tok, sft.build_rows(tok, load_samples(DataConfig(**ARITH))[:n], 64, packing=False)


def weights(path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_workers_take_the_same_sft_step_as_one(ray_cluster, tiny_base, tmp_path, strategy):
    tok, rows = sft_rows(tiny_base)
    rows[0] = (rows[0][0] + rows[1][0], rows[0][1] + rows[1][1])  # unequal lengths: the split balances tokens
    got = {}
    for workers in (1, 2):
        cfg = sft.Config(model=str(tiny_base), batch_size=4, lr=1e-3, warmup_steps=0,
                         learner=LearnerConfig(workers=workers, strategy=strategy))
        group = WorkerGroup(str(tiny_base), cfg.learner, sft.optim(cfg))
        metrics = sft.train_step(group, rows, cfg, tok.pad_token_id)
        got[workers] = (metrics, weights(group.save_hf(tmp_path / f"w{workers}", str(tiny_base))))
        group.close()
    (m1, w1), (m2, w2) = got[1], got[2]
    assert m1["tokens"] == m2["tokens"] and m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    moved = max(float((w1[k] - v).abs().max()) for k, v in weights(tiny_base).items())
    print(f"{strategy}: max |1 worker - 2 workers| {diff:.2e}, largest move {moved:.2e}")
    assert diff <= 1e-5 and moved > 100 * diff


def test_a_sigkilled_worker_fails_the_step_naming_it(ray_cluster, tiny_base):
    cfg = sft.Config(model=str(tiny_base), batch_size=2, learner=LearnerConfig(workers=2, collective_timeout_s=300))
    group = WorkerGroup(str(tiny_base), cfg.learner, sft.optim(cfg))
    tok, rows = sft_rows(tiny_base, n=64)
    pid = int(group.nodes[1].split("pid ")[1].rstrip(")"))
    threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"rank 1 on .* \(pid \d+\) died during train_step"):
        for _ in range(1000):  # steps until the kill lands mid-step
            sft.train_step(group, rows, cfg, tok.pad_token_id)
    assert time.monotonic() - t0 < 60, "a dead worker fails the step at once, not at the collective timeout"
    assert group.workers == [], "the surviving rank is killed rather than left waiting in a collective"


def _rank_1_dies_late_rank_0_breaks_first(model):
    import torch.distributed as dist
    if dist.get_rank() == 1:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("Connection reset by peer")  # what gloo raises on rank 0 before Ray sees rank 1 die


def test_the_rank_that_died_is_named_even_when_its_peer_fails_first(ray_cluster, tiny_base):
    group = WorkerGroup(str(tiny_base), LearnerConfig(workers=2))
    with pytest.raises(WorkerFailed, match=r"rank 1 on .* died during apply \(and rank 0 on .* failed during "
                                           r"apply: RuntimeError: Connection reset by peer\)"):
        group.apply(_rank_1_dies_late_rank_0_breaks_first)
    assert group.workers == []


def test_a_learner_larger_than_the_cluster_fails_before_starting(ray_cluster, tiny_base):
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(UserError, match=rf"learner asks for {int(cpus) + 1} workers x 1 CPU = {int(cpus) + 1} CPU, "
                                        rf"but the cluster has {cpus:g}"):
        WorkerGroup(str(tiny_base), LearnerConfig(workers=int(cpus) + 1))
    with pytest.raises(UserError, match=r"'spread' puts one worker per node: 2 workers, but the cluster has 1"):
        WorkerGroup(str(tiny_base), LearnerConfig(workers=2, cpus_per_worker=0.5, placement="spread"))


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_workers_take_the_same_grpo_step_as_one(ray_cluster, tiny_base, tmp_path, strategy):
    from experts import grpo

    g = torch.Generator().manual_seed(0)
    vocab = load_model(tiny_base).config.vocab_size
    lengths = [12, 7, 9, 5, 11, 6]
    ids = torch.randint(0, vocab, (6, 12), generator=g)
    attn = torch.zeros_like(ids)
    loss_mask = torch.zeros(6, 11)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
        loss_mask[i, 3 : n - 1] = 1  # 4 prompt tokens, the rest is response
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
             "rollout_logp": torch.zeros(6, 11), "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])}
    got = {}
    for workers in (1, 2):
        cfg = grpo.Config(model=str(tiny_base), lr=1e-3, kl_coef=0.1, micro_batch_size=2,
                          learner=LearnerConfig(workers=workers, strategy=strategy, cpus_per_worker=0.5))
        learner, ref = grpo.GRPOLearner(str(tiny_base), cfg), grpo.ReferencePolicy(str(tiny_base), cfg)
        metrics = learner.train_step(batch, ref.logprobs(batch))
        got[workers] = (metrics, weights(learner.save_final(str(tmp_path / f"w{workers}"))))
        learner.close()
        ref.close()
    (m1, w1), (m2, w2) = got[1], got[2]
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7) and m1["tokens"] == m2["tokens"]
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"{strategy}: max |1 worker - 2 workers| {diff:.2e}")
    assert diff <= 1e-5


def test_activation_checkpointing_changes_memory_not_the_step(tiny_base, tmp_path):
    tok, rows = sft_rows(tiny_base)
    got = []
    for ckpt in (False, True):
        cfg = sft.Config(model=str(tiny_base), batch_size=4, lr=1e-3, warmup_steps=0,
                         learner=LearnerConfig(activation_checkpointing=ckpt))
        group = WorkerGroup(str(tiny_base), cfg.learner, sft.optim(cfg), local=True)
        sft.train_step(group, rows, cfg, tok.pad_token_id)
        got.append(group.state_dict())
    assert max(float((got[0][k] - got[1][k]).abs().max()) for k in got[0]) <= 1e-6


def test_bfloat16_weights_train_and_save_in_bfloat16(tiny_base, tmp_path):
    tok, rows = sft_rows(tiny_base)
    cfg = sft.Config(model=str(tiny_base), batch_size=4, lr=1e-2, warmup_steps=0, learner=LearnerConfig(dtype="bfloat16"))
    group = WorkerGroup(str(tiny_base), cfg.learner, sft.optim(cfg), local=True)
    losses = [sft.train_step(group, rows, cfg, tok.pad_token_id)["loss"] for _ in range(5)]
    assert losses[-1] < losses[0]
    saved = load_model(group.save_hf(tmp_path / "bf16", str(tiny_base)), dtype=torch.bfloat16)
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}
