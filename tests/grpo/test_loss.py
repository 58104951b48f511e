"""GRPO's loss math matches hand-worked values and a naive per-token reference."""

from __future__ import annotations

import math

import pytest
import torch

from experts.grpo_loss import (
    aggregate,
    entropy_from_logits,
    group_advantages,
    informative_groups,
    kl_penalty,
    overlong_penalty,
    policy_loss,
    token_logprobs,
    truncated_is_weights,
)


def naive_kl(logp, ref, estimator):
    d = logp - ref
    return {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) + d - 1}[estimator]


def naive_loss(logp, old, adv, mask, lo, hi, agg, ref=None, beta=0.0, estimator="k2"):
    """Token by token with Python floats: the definition, written out."""
    rows = []
    for b in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(logp[b, t] - old[b, t])
            a = float(adv[b])
            term = max(-a * ratio, -a * min(max(ratio, 1 - lo), 1 + hi))
            if ref is not None:
                term += beta * naive_kl(float(logp[b, t]), float(ref[b, t]), estimator)
            terms.append(term)
        rows.append(terms)
    if agg == "token_mean":
        flat = [x for r in rows for x in r]
        return sum(flat) / len(flat)
    return sum(sum(r) / len(r) for r in rows) / len(rows)


def test_group_advantages_hand_worked():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.5774 -> +-0.5 / 0.5774 = +-0.8660
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    torch.testing.assert_close(adv[0], torch.tensor([0.8660, -0.8660, -0.8660, 0.8660]), atol=1e-4, rtol=0)
    assert torch.equal(adv[1], torch.zeros(4))  # equal rewards: zero advantage, no NaN
    # Dr. GRPO: no std division, [3, 1] -> mean 2 -> [1, -1]
    assert torch.equal(group_advantages(torch.tensor([[3.0, 1.0]]), scale="none"), torch.tensor([[1.0, -1.0]]))


def test_batch_scaling_keeps_a_format_only_difference_small():
    """Group 0 differs only by a 0.1-weight format reward (the checker ties), group 1 by the checker.

    group: each group by its own std -> both +-0.8660: the format tie-break weighs as much as solving.
      g0: mean 1.05, centred +-0.05, std sqrt(4 * 0.05^2 / 3) = 0.05774; g1: +-0.5 / 0.5774.
    batch: one std over all 8 rewards: mean 6.2 / 8 = 0.775, squared deviations
      2 x 0.225^2 + 2 x 0.325^2 + 2 x 0.775^2 + 2 x 0.225^2 = 1.615, / 7 -> std 0.48033;
      g0: +-0.05 / 0.48033 = +-0.10410, g1: +-0.5 / 0.48033 = +-1.04096.
    none: centred only, +-0.05 and +-0.5.
    """
    r = torch.tensor([[1.0, 1.1, 1.0, 1.1], [0.0, 1.0, 0.0, 1.0]])
    sign = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    torch.testing.assert_close(group_advantages(r, "group"), torch.stack([sign * 0.8660, sign * 0.8660]), atol=1e-4, rtol=0)
    torch.testing.assert_close(group_advantages(r, "batch"), torch.stack([sign * 0.10410, sign * 1.04096]), atol=1e-4, rtol=0)
    torch.testing.assert_close(group_advantages(r, "none"), torch.stack([sign * 0.05, sign * 0.5]), atol=1e-6, rtol=0)


def test_failed_rewards_leave_the_group_statistics():
    """A masked-out (failed) reward is not in its group's mean or std, and gets advantage 0.

    group 0: [1, 0, (9 failed), 0] -> counted {1, 0, 0}: mean 1/3, centred [2/3, -1/3, -1/3],
      unbiased std sqrt((4/9 + 1/9 + 1/9) / 2) = 0.57735 -> [1.1547, -0.5774, 0, -0.5774].
    group 1: one counted reward: nothing to compare it with -> all 0, and not informative.
    """
    r = torch.tensor([[1.0, 0.0, 9.0, 0.0], [5.0, 1.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, False, True], [False, True, False, False]])
    adv = group_advantages(r, "group", mask)
    torch.testing.assert_close(adv, torch.tensor([[1.1547, -0.5774, 0.0, -0.5774], [0.0] * 4]), atol=1e-4, rtol=0)
    # batch: the std of the 4 counted rewards {1, 0, 0, 1} (mean 0.5): sqrt(4 * 0.25 / 3) = 0.57735
    torch.testing.assert_close(group_advantages(r, "batch", mask)[0], torch.tensor([2 / 3, -1 / 3, 0.0, -1 / 3]) / 0.57735,
                               atol=1e-4, rtol=0)
    assert informative_groups(r, mask).tolist() == [True, False]
    # the failed 9 does not make group 0's spread; without the mask it would
    assert informative_groups(torch.tensor([[0.0, 0.0, 9.0]]), torch.tensor([[True, True, False]])).tolist() == [False]
    assert informative_groups(torch.tensor([[0.0, 0.0, 9.0]])).tolist() == [True]


def test_group_advantages_match_a_naive_reference_on_random_rewards():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    got = {s: group_advantages(r, s, mask) for s in ("group", "batch", "none")}
    counted = [x for row, m in zip(r.tolist(), mask.tolist()) for x, k in zip(row, m) if k]
    mu = sum(counted) / len(counted)
    batch_std = math.sqrt(sum((x - mu) ** 2 for x in counted) / (len(counted) - 1))
    for i in range(6):
        xs = [x for x, k in zip(r[i].tolist(), mask[i].tolist()) if k]
        for j in range(5):
            if not mask[i, j] or len(xs) < 2:
                assert all(float(got[s][i, j]) == 0 for s in got)
                continue
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
            c = float(r[i, j]) - mean
            assert float(got["none"][i, j]) == pytest.approx(c, abs=1e-5)
            assert float(got["group"][i, j]) == pytest.approx(c / (std + 1e-6), abs=1e-4)
            assert float(got["batch"][i, j]) == pytest.approx(c / (batch_std + 1e-6), abs=1e-5)


def test_clipping_on_both_sides_hand_worked():
    # ratio = e^(logp - old): token 0 ratio 1.5 (above 1 + 0.28), token 1 ratio 0.5 (below 1 - 0.2)
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    mask = torch.ones(1, 2)
    # A = +1: token 0 is clipped to 1.28 -> -1.28; token 1 stays 0.5 (pessimistic max) -> -0.5
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5) / 2)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    # A = -1: token 0 stays 1.5 -> +1.5; token 1 is clipped up to 0.8 -> +0.8
    loss, stats = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2)
    assert stats["clip_frac"].item() == pytest.approx(0.5)


def test_truncated_importance_sampling_hand_worked():
    """Each token's policy-gradient term is weighted by min(pi_old / pi_rollout, cap).

    Three tokens, all on-policy for the learner (logp == old: ratio 1, no PPO clipping), A = +2:
      token 0: rollout gave it the learner's probability      -> weight 1       -> -2
      token 1: rollout's probability 4x lower than the learner -> weight 4 > cap -> cap 3 -> -6 (exactly cap x -A)
      token 2: rollout's probability 2x higher                 -> weight 0.5    -> -1
    """
    old = torch.log(torch.tensor([[0.5, 0.4, 0.2]]))
    rollout = torch.log(torch.tensor([[0.5, 0.1, 0.4]]))
    w = truncated_is_weights(old, rollout, cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 3.0, 0.5]]))
    logp = old.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 3), agg="token_mean", normaliser=1.0, is_weights=w)
    assert loss.item() == pytest.approx(-2.0 - 3.0 * 2.0 - 0.5 * 2.0)
    loss.backward()  # d/dlogp of -A * w * ratio at ratio 1 is -A * w: the weight scales the gradient too
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -6.0, -1.0]]))
    # the weight is a constant of the step: no gradient flows into the rollout's or old log-probs
    assert not w.requires_grad


def test_grpo_objective_reports_the_rollout_gap_and_capped_share(tiny_base):
    """The learner objective weights tokens by TIS and reports mean / max |gap| and the capped share."""
    from experts.grpo import grpo_loss
    from experts.models import load_model

    model = load_model(tiny_base)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logp = token_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:], 1.0)
    shift = torch.tensor([[0.0, 0.0, 3.0]])  # the rollout engine gave the last token e^-3 of the learner's probability
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.tensor([[0.0, 1.0, 1.0]]),
          "rollout_logp": logp - shift, "advantages": torch.tensor([1.0])}
    kw = dict(temperature=1.0, clip_low=0.2, clip_high=0.28, loss_agg="token_mean", kl_coef=0.0)
    loss, st = grpo_loss(model, mb, tis_cap=2.0, **kw)
    plain, _ = grpo_loss(model, mb, tis_cap=None, **kw)
    # token 1: weight 1 -> -1 (x ratio 1); token 2: e^3 capped to 2 -> -2
    assert loss.item() == pytest.approx(-3.0, abs=1e-5) and plain.item() == pytest.approx(-2.0, abs=1e-5)
    assert st["tis/capped"] == 1.0 and st["tis/weight"] == pytest.approx(3.0)
    assert st["logp_gap"] == pytest.approx(3.0, abs=1e-5) and st["max/logp_gap"] == pytest.approx(3.0, abs=1e-5)


def test_grpo_objective_scoring_only_trained_positions_equals_the_full_forward(tiny_base):
    """Logits from the first trained column on (`logits_to_keep`) give the full forward's loss and gradient."""
    from experts.grpo import grpo_loss
    from experts.models import load_model

    model = load_model(tiny_base)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 0], [5, 6, 7, 8, 9, 10, 11]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7])
    mask = torch.tensor([[0.0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]])  # prompts of 4 and 3 tokens
    g = torch.Generator().manual_seed(0)
    mb = {"input_ids": ids, "attention_mask": attn, "loss_mask": mask, "advantages": torch.tensor([1.0, -0.5]),
          "rollout_logp": -torch.rand(2, 6, generator=g), "old_logp": -torch.rand(2, 6, generator=g),
          "ref_logp": -torch.rand(2, 6, generator=g)}
    kw = dict(temperature=0.7, clip_low=0.2, clip_high=0.28, loss_agg="token_mean", kl_coef=0.1, tis_cap=2.0)
    loss, _ = grpo_loss(model, mb, **kw)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logp = token_logprobs(model(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:], 0.7)
    w = truncated_is_weights(mb["old_logp"], mb["rollout_logp"], 2.0)
    ref, _ = policy_loss(logp, mb["old_logp"], mb["advantages"], mask, 0.2, 0.28, "token_mean",
                         ref_logp=mb["ref_logp"], kl_coef=0.1, normaliser=1.0, is_weights=w)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-4)


def test_token_mean_and_seq_mean_differ_as_worked_by_hand():
    # row 0 has 1 token of value 1, row 1 has 3 tokens of value 3 (one position masked out)
    values = torch.tensor([[1.0, 9.0, 9.0, 9.0], [3.0, 3.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    assert aggregate(values, mask, "token_mean").item() == pytest.approx((1 + 9) / 4)  # 2.5
    assert aggregate(values, mask, "seq_mean").item() == pytest.approx((1 + 3) / 2)  # 2.0


def test_kl_estimators_hand_worked():
    # d = logp - ref = 1, -1, 0
    logp, ref = torch.tensor([0.0, 0.0, -1.0]), torch.tensor([-1.0, 1.0, -1.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 0.5, 0.0]))  # d^2 / 2
    # k3 = e^-d + d - 1: e^-1 + 0 = 0.3679; e - 2 = 0.7183; 0
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([0.3679, 0.7183, 0.0]), atol=1e-4, rtol=0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, generator=g), torch.randn(100, generator=g)
    assert (kl_penalty(a, b, "k3") >= 0).all() and (kl_penalty(a, b, "k2") >= 0).all()


def test_kl_estimators_expected_values_and_gradients_on_a_categorical():
    """pi = softmax(theta) over 6 tokens, ref fixed. Exactly, with no sampling: the expectation under pi
    of a per-token loss is its sum over tokens weighted by pi, held fixed (detached) as the sampler is.

    - k1 and k3 are unbiased values of KL(pi || ref); k2 is not.
    - As losses, their expected gradients: k2's is the gradient of KL(pi || ref) (the one a KL penalty
      means); k3's is the gradient of the reverse KL(ref || pi); k1's is 0 (Tang & Munos 2025).
    """
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)

    def expected(estimator):
        logp = torch.log_softmax(theta, 0)
        value = (logp.exp().detach() * kl_penalty(logp, ref, estimator)).sum()
        return value.detach(), torch.autograd.grad(value, theta)[0]

    def exact(direction):
        logp = torch.log_softmax(theta, 0)
        kl = (logp.exp() * (logp - ref)).sum() if direction == "pi||ref" else (ref.exp() * (ref - logp)).sum()
        return kl.detach(), torch.autograd.grad(kl, theta)[0]

    forward, forward_grad = exact("pi||ref")
    _, reverse_grad = exact("ref||pi")
    for estimator in ("k1", "k3"):
        assert expected(estimator)[0].item() == pytest.approx(forward.item(), abs=1e-12)
    assert expected("k2")[0].item() != pytest.approx(forward.item(), rel=1e-3)
    torch.testing.assert_close(expected("k2")[1], forward_grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(expected("k3")[1], reverse_grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(expected("k1")[1], torch.zeros(6, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (expected("k3")[1] - forward_grad).abs().max() > 1e-2  # the two directions really differ here


def test_k3_is_an_unbiased_kl_estimate_by_sampling():
    """Sampling x ~ p, the mean of k3 approaches the exact KL(p || q)."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = kl_penalty(p.log()[x], q.log()[x], "k3").mean()
    exact = (p * (p.log() - q.log())).sum()
    assert estimate.item() == pytest.approx(exact.item(), rel=0.03)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("beta, estimator", [(0.0, "k2"), (0.05, "k1"), (0.05, "k2"), (0.05, "k3")])
def test_policy_loss_matches_naive_reference_on_random_tensors(agg, beta, estimator):
    g = torch.Generator().manual_seed(1)
    B, T = 5, 7
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.4  # ratios on both sides of the clip range
    ref = old + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[:, 0] = 1  # every row has a token
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, 0.28, agg, ref_logp=ref, kl_coef=beta, kl_estimator=estimator)
    want = naive_loss(logp, old, adv, mask.bool(), 0.2, 0.28, agg, ref if beta else None, beta, estimator)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert 0 < stats["clip_frac"].item() < 1
    # the `kl` statistic is the chosen estimator's mean over trained tokens
    kl = [naive_kl(float(logp[b, t]), float(ref[b, t]), estimator) for b in range(B) for t in range(T) if mask[b, t]]
    assert stats["kl"].item() == pytest.approx(sum(kl) / len(kl), rel=1e-5)


def test_masked_tokens_get_no_gradient():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, _ = policy_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert torch.equal(logp.grad == 0, mask == 0)


def test_micro_batches_with_a_shared_normaliser_sum_to_the_full_batch_loss():
    g = torch.Generator().manual_seed(2)
    logp, old = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    adv, mask = torch.randn(6, generator=g), (torch.rand(6, 5, generator=g) > 0.4).float()
    for agg, n in (("token_mean", mask.sum().item()), ("seq_mean", 6)):
        full, _ = policy_loss(logp, old, adv, mask, agg=agg)
        parts = sum(policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], agg=agg, normaliser=n)[0]
                    for i in range(0, 6, 2))
        assert parts.item() == pytest.approx(full.item(), rel=1e-5)


def test_dynamic_sampling_and_overlong_shaping():
    assert informative_groups(torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 1.0]])).tolist() == [False, True]
    # a spread of 1e-3 is signal by default, a tie under tol=0.01
    assert informative_groups(torch.tensor([[0.5, 0.501]])).tolist() == [True]
    assert informative_groups(torch.tensor([[0.5, 0.501]]), tol=0.01).tolist() == [False]
    # max 20, buffer 8: free up to 12, then -1/8 per token, -1 at 20
    assert overlong_penalty(torch.tensor([5, 12, 16, 20]), 20, 8).tolist() == [0.0, 0.0, -0.5, -1.0]
    # one budget per response: 16 tokens of 20 -> -0.5; of 64 -> 0; a budget of 4 under the buffer of 8
    # ramps over all of it: 2 of 4 -> -0.5
    assert overlong_penalty(torch.tensor([16, 16, 2]), torch.tensor([20, 64, 4]), 8).tolist() == [-0.5, 0.0, -0.5]


def test_logprobs_and_entropy_of_a_uniform_distribution():
    logits = torch.zeros(1, 2, 4)
    torch.testing.assert_close(token_logprobs(logits, torch.tensor([[0, 3]])), torch.full((1, 2), -math.log(4)))
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((1, 2), math.log(4)))
    # temperature 0.5 doubles the logits: [2, 0] -> p = e^2 / (e^2 + 1) = 0.8808
    assert token_logprobs(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[0]]), 0.5).exp().item() == pytest.approx(0.8808, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])  # one row, a size that does not divide B*T, one chunk
def test_chunked_logprobs_and_entropy_equal_the_naive_full_softmax(dtype, chunk):
    """Chunking changes memory, not values: log-probs, entropy and their gradients match a full
    fp32 log_softmax over [B, T, V] to 1e-6."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 11, generator=g)).to(dtype)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)
    t = 0.7

    def grads(fn):
        x = logits.clone().requires_grad_(True)
        out = fn(x)
        (out * weights).sum().backward()
        return out.detach(), x.grad.float()

    naive_logp = lambda x: torch.log_softmax(x.float() / t, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    naive_ent = lambda x: -(torch.log_softmax(x.float() / t, -1).exp() * torch.log_softmax(x.float() / t, -1)).sum(-1)
    for ours, naive in ((lambda x: token_logprobs(x, tokens, t, chunk=chunk), naive_logp),
                        (lambda x: entropy_from_logits(x, t, chunk=chunk), naive_ent)):
        (got, got_grad), (want, want_grad) = grads(ours), grads(naive)
        assert got.dtype == torch.float32 and got.shape == (3, 5)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(ours(logits), want, atol=1e-6, rtol=0)
    assert torch.equal(logits, (3 * torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))).to(dtype)), \
        "the logits are read, never written"


def test_docstring_examples():
    import doctest

    import experts.grpo_loss

    assert doctest.testmod(experts.grpo_loss).failed == 0
