"""One OPD optimizer step's loss: each domain weighs the same, only sampled tokens count, and the
gradient does not depend on how the step is split into micro-batches and ranks."""

import pytest
import torch

from distill.cache import CacheWriter, step_batches
from distill.opd import _pad_teacher
from distill.student import DistillStudent, RankStep, opd_objective, rank_weights
from distill.teacher import rank_root, response_hidden, split_groups, write_teacher_cache
from experts.models import load_model, load_tokenizer
from rollout.types import Rollout

DOMAINS = ["d00", "d01", "d02"]  # teacher k answers DOMAINS[k]


def _rollout(g, sid, domain, prompt_len, response_len, untrained=()):
    """A hand-made rollout; response tokens at `untrained` have loss mask 0 (tool results, forced `</think>`)."""
    ids = torch.randint(3, 300, (prompt_len + response_len,), generator=g).tolist()
    mask = [0 if j in untrained else 1 for j in range(response_len)]
    return Rollout({"id": sid, "domain": domain}, 0, ids[:prompt_len], ids[prompt_len:], mask, [0.0] * response_len,
                   "", True)


def _step(g):
    """One step's rollouts, lopsided on purpose: d00 one long episode with a masked tool result,
    d01 four short answers (one with a forced `</think>`), d02 two medium ones."""
    return ([_rollout(g, "a0", "d00", 6, 30, untrained=range(8, 16))]
            + [_rollout(g, f"b{i}", "d01", 5, 3 + i, untrained=(1,) if i == 2 else ()) for i in range(4)]
            + [_rollout(g, f"c{i}", "d02", 4, 8 + 4 * i) for i in range(2)])


def _write_ranks(world, rollouts, teacher_paths, root):
    """Each rank's cache, as the stage writes it (batch_size 1: teacher states computed sequence by sequence)."""
    groups = {}
    for ro in rollouts:
        groups.setdefault((DOMAINS.index(ro.domain), 0), []).append(ro)
    teachers = [{"name": d, "path": str(p), "domains": [d]} for d, p in zip(DOMAINS, teacher_paths)]
    indexes = []
    for rank, share in enumerate(split_groups(groups, world)):
        writer = CacheWriter(rank_root(root, rank), 1, teachers, policy="p", dtype=torch.float32)
        write_teacher_cache(share, teacher_paths, writer, pad_id=0, load=load_model, batch_size=1)
        indexes.append(writer.close())
    return indexes


def _cached_step_grads(student_path, teacher_paths, root, indexes, balance, batch_tokens):
    """The step as the group runs it: every rank streams its own micro-batches; gradients add up over
    ranks (DDP/FSDP average the ranks' gradients of loss * world, i.e. sum them)."""
    model = DistillStudent(load_model(student_path, torch.float64), [str(p) for p in teacher_paths])
    weights = rank_weights(indexes, 0, balance)
    n = max(step_batches(ix, batch_tokens).get(0, 0) for ix in indexes)
    loss, micro_batches = 0.0, 0
    for k in range(len(indexes)):
        stream = RankStep(rank_root(root, k), 1, "p", batch_tokens, 0, n, 0, DOMAINS, _pad_teacher(indexes, 0),
                          weights[k])
        for mb, real in stream:
            part, _ = opd_objective(model, mb, divergence="reverse_kl", temperature=1.0, beta=0.5, chunk_size=16,
                                    domains=DOMAINS, teachers=DOMAINS)
            (part * real).backward()
            loss += float(part.detach()) * real
            micro_batches += real
    return loss, {k.removeprefix("inner."): p.grad for k, p in model.named_parameters()}, micro_batches


def _reference(student_path, teacher_paths, rollouts, balance):
    """The step's loss written out by hand on the full batch: full logits, one sequence at a time,
    each sequence's divergence at its trained tokens only, then the means `balance` names."""
    student = load_model(student_path, torch.float64)
    teachers = [load_model(p) for p in teacher_paths]
    per_seq = []
    for ro in rollouts:
        ids, p = torch.tensor([ro.prompt_ids + ro.response_ids]), len(ro.prompt_ids)
        hs = student.get_decoder()(input_ids=ids).last_hidden_state[0, p - 1 : -1]  # predicts response tokens
        t = teachers[DOMAINS.index(ro.domain)]
        with torch.no_grad():
            ht = response_hidden(t, [ids[0]], [p], pad_id=0)
        log_q = torch.log_softmax(hs @ student.lm_head.weight.T, -1)  # [response, vocab]
        log_p = torch.log_softmax(ht.double() @ t.lm_head.weight.double().T, -1)
        div = (log_q.exp() * (log_q - log_p)).sum(-1)  # KL(student || teacher) at every response token
        per_seq.append((ro.domain, div[torch.tensor(ro.loss_mask, dtype=torch.bool)]))
    if balance == "domain":
        present = sorted({dom for dom, _ in per_seq})
        loss = torch.stack([torch.cat([d for dom, d in per_seq if dom == x]).mean() for x in present]).mean()
    elif balance == "sequence":
        loss = torch.stack([d.mean() for _, d in per_seq]).mean()
    else:
        loss = torch.cat([d for _, d in per_seq]).mean()
    loss.backward()
    return float(loss.detach()), {k: p.grad for k, p in student.named_parameters()}


def _rel(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in b) / max(float(v.abs().max()) for v in b.values())


@pytest.mark.parametrize("balance", ["domain", "sequence", "token"])
def test_a_steps_gradient_is_the_hand_written_mean_over_micro_batches_and_ranks(toy_world, tmp_path, balance):
    """2 ranks x micro-batches of at most 20 tokens give the gradient of the naive full-batch loss
    (for `domain`: the mean over domains of each domain's per-token mean) within 1e-6 relative."""
    teacher_paths = toy_world.teachers[:3]
    rollouts = _step(torch.Generator().manual_seed(0))
    root = str(tmp_path / "cache")
    indexes = _write_ranks(2, rollouts, teacher_paths, root)
    loss, grads, micro_batches = _cached_step_grads(toy_world.student, teacher_paths, root, indexes, balance, 20)
    ref_loss, ref_grads = _reference(toy_world.student, teacher_paths, rollouts, balance)
    assert all(ix["shards"] for ix in indexes) and micro_batches > 2 * len(indexes), "split over ranks and micro-batches"
    assert loss == pytest.approx(ref_loss, rel=1e-9)
    assert _rel(grads, ref_grads) < 1e-6
    if balance == "domain":  # and the balance matters here: the token mean is another gradient
        _, token_grads = _reference(toy_world.student, teacher_paths, rollouts, "token")
        assert _rel(token_grads, ref_grads) > 0.05


def test_tokens_the_student_did_not_sample_are_not_distilled(toy_world, tmp_path):
    """A tool result and a forced `</think>` (loss mask 0) get no cached state and add nothing to the
    loss or its gradient: the step is the mean over the sampled tokens alone."""
    teacher_paths = toy_world.teachers[:1]
    g = torch.Generator().manual_seed(1)
    ro = _rollout(g, "a0", "d00", 5, 16, untrained=(3, 4, 5, 6, 11))
    root = str(tmp_path / "cache")
    indexes = _write_ranks(1, [ro], teacher_paths, root)
    assert indexes[0]["shards"][0]["rows"] == sum(ro.loss_mask) == 11, "states of sampled tokens only"
    loss, grads, _ = _cached_step_grads(toy_world.student, teacher_paths, root, indexes, "domain", 100)
    ref_loss, ref_grads = _reference(toy_world.student, teacher_paths, [ro], "domain")
    assert loss == pytest.approx(ref_loss, rel=1e-9) and _rel(grads, ref_grads) < 1e-6
    everything = Rollout(ro.sample, 0, ro.prompt_ids, ro.response_ids, [1] * 16, ro.logprobs, "", True)
    all_loss, all_grads = _reference(toy_world.student, teacher_paths, [everything], "domain")
    assert all_loss != pytest.approx(loss, rel=1e-3) and _rel(all_grads, ref_grads) > 0.01, \
        "the masked tokens would have counted"
    assert load_tokenizer(toy_world.student).pad_token_id == 0  # the pad id these hand-made batches use
