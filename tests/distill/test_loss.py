"""The chunked distillation loss is the naive full-logits loss, values and gradients."""

import math

import pytest
import torch

from distill.loss import DIVERGENCES, balance_weights, distill_loss, distill_loss_reference


def _inputs(tokens=37, hidden_s=8, hidden_t=12, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(tokens, hidden_s, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(vocab, hidden_s, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(tokens, hidden_t, generator=g, dtype=torch.float64)
    wt = torch.randn(vocab, hidden_t, generator=g, dtype=torch.float64)
    mask = torch.rand(tokens, generator=g) > 0.3
    return hs, ws, ht, wt, mask


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_chunked_equals_naive_values_and_gradients(divergence, temperature):
    hs, ws, ht, wt, mask = _inputs()
    kw = dict(mask=mask, divergence=divergence, temperature=temperature, beta=0.3)
    # chunk_size 8 over 37 tokens: several chunks and a ragged last one
    got = distill_loss(hs, ws, ht, wt, chunk_size=8, **kw)
    g_hs, g_ws = torch.autograd.grad(got.loss, (hs, ws))
    ref = distill_loss_reference(hs, ws, ht, wt, **kw)
    r_hs, r_ws = torch.autograd.grad(ref.loss, (hs, ws))

    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.per_token, ref.per_token, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_hs, r_hs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_ws, r_ws, atol=1e-5, rtol=1e-5)
    assert (got.per_token[~mask] == 0).all() and (g_hs[~mask] == 0).all(), "masked tokens contribute nothing"
    assert got.loss > 0


def test_scaled_upstream_gradient_and_float32_bf16_teacher():
    """loss * 3 scales the gradient by 3; a bf16 cached teacher and a float32 student work."""
    hs, ws, ht, wt, mask = _inputs()
    hs32 = hs.detach().float().requires_grad_()
    ws32 = ws.detach().float().requires_grad_()
    out = distill_loss(hs32, ws32, ht.bfloat16(), wt.float(), mask, chunk_size=5)
    (3 * out.loss).backward()
    ref = distill_loss_reference(hs32, ws32, ht.bfloat16().float(), wt.float(), mask)
    r_hs, r_ws = torch.autograd.grad(3 * ref.loss, (hs32, ws32))
    torch.testing.assert_close(hs32.grad, r_hs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ws32.grad, r_ws, atol=1e-5, rtol=1e-4)
    assert hs32.grad.dtype == torch.float32


def test_hand_worked_two_token_vocabulary():
    # student logits [0, 0] -> q = [1/2, 1/2]; teacher logits [0, ln 3] -> p = [1/4, 3/4]
    eye = torch.eye(2, dtype=torch.float64)
    hs = torch.zeros(1, 2, dtype=torch.float64)
    ht = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64)
    # reverse KL(q||p) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3) = 0.143841
    assert distill_loss(hs, eye, ht, eye).loss.item() == pytest.approx(0.5 * math.log(4 / 3))
    # forward KL(p||q) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812
    fwd = distill_loss(hs, eye, ht, eye, divergence="forward_kl").loss.item()
    assert fwd == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    # JSD(0.5): m = [3/8, 5/8]; 1/2 KL(p||m) + 1/2 KL(q||m) = 0.0358 (symmetric JS divergence)
    m = [3 / 8, 5 / 8]
    jsd = 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    assert distill_loss(hs, eye, ht, eye, divergence="jsd", beta=0.5).loss.item() == pytest.approx(jsd)
    # identical distributions: every divergence is 0
    for d in DIVERGENCES:
        assert distill_loss(ht, eye, ht, eye, divergence=d).loss.item() == pytest.approx(0.0, abs=1e-12)


def test_gradients_reach_the_student_only_and_no_grad_mode_is_cheap():
    hs, ws, ht, wt, mask = _inputs()
    ht.requires_grad_()
    wt.requires_grad_()
    out = distill_loss(hs, ws, ht, wt, mask)
    out.loss.backward()
    assert hs.grad is not None and ws.grad is not None
    assert ht.grad is None and wt.grad is None
    with torch.no_grad():
        assert distill_loss(hs, ws, ht, wt, mask).loss.grad_fn is None


def test_weighted_loss_equals_naive_weighted_sum():
    """`weights` turns the mean into sum(weights * per-token divergence), values and gradients."""
    hs, ws, ht, wt, mask = _inputs()
    weights = torch.rand(len(mask), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = distill_loss(hs, ws, ht, wt, mask, chunk_size=8, weights=weights)
    ref = distill_loss_reference(hs, ws, ht, wt, mask, weights=weights)
    torch.testing.assert_close(got.loss, (ref.per_token * weights).sum(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-12, rtol=1e-10)
    for g, r in zip(torch.autograd.grad(got.loss, (hs, ws)), torch.autograd.grad(ref.loss, (hs, ws))):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)
    # uniform weights 1/n over the masked tokens are the plain mean
    mean = distill_loss(hs, ws, ht, wt, mask, weights=torch.full((len(mask),), 1 / int(mask.sum()), dtype=torch.float64))
    torch.testing.assert_close(mean.loss, distill_loss(hs, ws, ht, wt, mask).loss)


def test_balance_weights_hand_worked():
    # A step of 4 sequences: math 2 + 2 tokens, chat 12, agent 4 (20 tokens, 3 domains).
    domains, tokens = ["math", "chat", "math", "agent"], [2, 12, 2, 4]
    # domain: each domain 1/3 of the loss, spread over its tokens: math 1/(3*4), chat 1/(3*12), agent 1/(3*4)
    assert balance_weights(domains, tokens, "domain") == pytest.approx([1 / 12, 1 / 36, 1 / 12, 1 / 12])
    # sequence: each sequence 1/4, spread over its tokens
    assert balance_weights(domains, tokens, "sequence") == pytest.approx([1 / 8, 1 / 48, 1 / 8, 1 / 16])
    # token: every token 1/20 (chat, 60% of the tokens, gets 60% of the loss)
    assert balance_weights(domains, tokens, "token") == pytest.approx([1 / 20] * 4)
    for b in ("domain", "sequence", "token"):  # each is a weighted mean: the weights of all tokens sum to 1
        assert sum(w * n for w, n in zip(balance_weights(domains, tokens, b), tokens)) == pytest.approx(1.0)
    # a sequence without trained tokens weighs nothing and is not counted
    assert balance_weights(["math", "chat"], [3, 0], "domain") == [1 / 3, 0.0]
    with pytest.raises(ValueError, match="balance must be"):
        balance_weights(domains, tokens, "prompt")


def test_bad_arguments_are_clear_errors():
    hs, ws, ht, wt, mask = _inputs()
    with pytest.raises(ValueError, match="divergence must be one of"):
        distill_loss(hs, ws, ht, wt, divergence="kl")
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill_loss(hs, ws, ht, wt[:-1])
    with pytest.raises(ValueError, match="0 < beta < 1"):
        distill_loss(hs, ws, ht, wt, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="weights must be"):
        distill_loss(hs, ws, ht, wt, weights=torch.ones(3))
