"""Logit-level distillation losses that never hold full [tokens, vocab] logits for all tokens at once.

`distill_loss` takes last-layer hidden states and LM heads of a student and a teacher and returns
the per-token divergence between their next-token distributions, masked to response tokens (or
weighted per token: `balance_weights` gives each domain of an optimizer step the same weight):

    reverse_kl (default)  KL(student || teacher)   mode-seeking; what on-policy distillation uses
                          (Gu et al. 2024, MiniLLM; Agarwal et al. 2024, GKD; DeepSeek-V4 OPD).
    forward_kl            KL(teacher || student)   classic Hinton-style distillation.
    jsd                   generalised JSD(beta) of GKD (Agarwal et al. 2024, eq. 3):
                          beta * KL(T || M) + (1 - beta) * KL(S || M),  M = beta*T + (1 - beta)*S.
                          It tends to forward KL as beta -> 0 and reverse KL as beta -> 1 after
                          dividing by the scale, so those ends are the two options above instead.

Both distributions are softmax(logits / temperature). Unlike Hinton et al. the loss is not scaled
by temperature**2: GKD and OPD use temperature 1, where it makes no difference.

How it stays small (the fused-linear trick of Liger-Kernel's FusedLinearCrossEntropy): tokens are
processed `chunk_size` at a time; for each chunk the student and teacher logits are built, the
divergence and its gradient with respect to the student logits are computed in closed form, and
that gradient is immediately contracted into grad(student_hidden) and grad(student_head). Peak
extra memory is a few [chunk, vocab] buffers plus one [vocab, hidden] gradient. Computing the
gradient during the forward pass, rather than recomputing every chunk in backward, is what keeps
the time at that of the naive version (4 matmuls, not 6); it is exact because the loss is a
scalar, so backward only has to scale the stored gradients by grad_output.

Closed-form gradients, with q = softmax(s), s = student logits / T, p = teacher probabilities:
    forward KL  dL/ds = q - p
    reverse KL  dL/ds = q * (g - sum(q * g)),  g = log q - log p
    JSD(beta)   dL/ds = q * (g - sum(q * g)),  g = (1 - beta) * (log q - log m),  m = beta p + (1-beta) q
and dL/d(logits) = dL/ds / T. `distill_loss_reference` is the naive full-logits autograd version
the tests and `bench/opd_loss.py` check these against.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Sequence

import torch

Divergence = Literal["reverse_kl", "forward_kl", "jsd"]
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
Balance = Literal["domain", "sequence", "token"]


class DistillLoss(NamedTuple):
    loss: torch.Tensor  # [] mean of per_token over masked tokens (or sum of weights * per_token); differentiable
    per_token: torch.Tensor  # [tokens] divergence per token, 0 where masked out; detached, for metrics


def balance_weights(domains: Sequence[str], tokens: Sequence[int], balance: Balance = "domain") -> list[float]:
    """The loss weight of each token of each sequence of one optimizer step: the step's loss is
    sum over sequences of weight * (its tokens' summed divergence), and the weights sum to 1.

    domains, tokens: each sequence's domain and trained-token count, over the whole step (every
    micro-batch of every rank), so that the step's loss does not depend on how it is split.

        domain    each domain present weighs the same:   1 / (domains in the step * that domain's tokens)
        sequence  each sequence weighs the same:         1 / (sequences * its tokens)
        token     each token weighs the same:            1 / tokens in the step

    A plain token mean lets domains with long responses (instructions, agent episodes) drown out
    short-answer domains (math): "domain" is the mean over domains of each domain's token mean.
    A sequence with no tokens gets weight 0 and is not counted.

    >>> balance_weights(["math", "chat", "chat"], [2, 6, 10], "domain")  # math 1/(2*2), chat 1/(2*16)
    [0.25, 0.03125, 0.03125]
    >>> balance_weights(["math", "chat"], [2, 6], "sequence")  # 1/(2*2), 1/(2*6)
    [0.25, 0.08333333333333333]
    >>> balance_weights(["math", "chat"], [2, 6], "token")
    [0.125, 0.125]
    """
    if len(domains) != len(tokens):
        raise ValueError(f"{len(domains)} domains for {len(tokens)} token counts")
    per_domain: dict[str, int] = {}
    for d, n in zip(domains, tokens):
        if n > 0:
            per_domain[d] = per_domain.get(d, 0) + n
    sequences, total = sum(n > 0 for n in tokens), sum(per_domain.values())
    if balance == "domain":
        return [1 / (len(per_domain) * per_domain[d]) if n > 0 else 0.0 for d, n in zip(domains, tokens)]
    if balance == "sequence":
        return [1 / (sequences * n) if n > 0 else 0.0 for n in tokens]
    if balance == "token":
        return [1 / total if n > 0 else 0.0 for n in tokens]
    raise ValueError(f"balance must be domain, sequence or token, got {balance!r}")


def distill_loss(
    student_hidden: torch.Tensor,  # [tokens, hidden_s]  last-layer states after the final norm
    student_head: torch.Tensor,  # [vocab, hidden_s]
    teacher_hidden: torch.Tensor,  # [tokens, hidden_t]  may be bf16 (as cached); no gradient flows here
    teacher_head: torch.Tensor,  # [vocab, hidden_t]
    mask: torch.Tensor | None = None,  # [tokens] bool or 0/1: which tokens count (response tokens)
    divergence: Divergence = "reverse_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int = 512,
    weights: torch.Tensor | None = None,  # [tokens] per-token loss weights instead of the mean; 0: left out
) -> DistillLoss:
    """Mean per-token divergence between student and teacher next-token distributions, chunked
    (with `weights`: sum(weights * per-token divergence) over the masked tokens).

    Row i of both hidden tensors must predict the same token. Gradients reach `student_hidden` and
    `student_head` only. Computes in float32 (float64 if the student is float64).
    """
    _check(student_hidden, student_head, teacher_hidden, teacher_head, mask, divergence, temperature, beta, weights)
    weights = _token_weights(student_hidden, mask, weights)
    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad)
    loss, per_token = _ChunkedDistill.apply(
        student_hidden, student_head, teacher_hidden, teacher_head, weights,
        divergence, float(temperature), float(beta), int(chunk_size), needs_grad,
    )
    return DistillLoss(loss, per_token)


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, weights, divergence, temperature, beta, chunk_size, needs_grad):
        dtype = _compute_dtype(hs)
        rows = weights.nonzero().squeeze(1)  # masked-out tokens cost nothing
        per_token = torch.zeros(hs.shape[0], dtype=dtype, device=hs.device)
        grad_hs = torch.zeros(hs.shape, dtype=dtype, device=hs.device) if needs_grad and ctx.needs_input_grad[0] else None
        grad_ws = torch.zeros(ws.shape, dtype=dtype, device=ws.device) if needs_grad and ctx.needs_input_grad[1] else None
        ws_c, wt_c = ws.detach().to(dtype), wt.detach().to(dtype)  # no copy when already `dtype`
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start : start + chunk_size]
            h_s = hs.detach().index_select(0, idx).to(dtype)  # [chunk, hidden_s]
            h_t = ht.detach().index_select(0, idx).to(dtype)  # [chunk, hidden_t]
            div, dlogits = _divergence_and_grad(
                h_s @ ws_c.T, h_t @ wt_c.T, divergence, temperature, beta, want_grad=grad_hs is not None or grad_ws is not None
            )
            per_token.index_copy_(0, idx, div)
            if dlogits is not None:
                dlogits.mul_((weights.index_select(0, idx) / temperature).unsqueeze(1))  # [chunk, vocab]
                if grad_hs is not None:
                    grad_hs.index_copy_(0, idx, dlogits @ ws_c)
                if grad_ws is not None:
                    grad_ws.addmm_(dlogits.T, h_s)
            del dlogits  # free this chunk's logits before the next chunk's are built
        ctx.save_for_backward(grad_hs, grad_ws)
        ctx.dtypes = (hs.dtype, ws.dtype)
        ctx.mark_non_differentiable(per_token)
        loss = (per_token * weights).sum()
        return loss, per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        grad_hs, grad_ws = ctx.saved_tensors
        if grad_hs is None and grad_ws is None and any(ctx.needs_input_grad[:2]):
            raise RuntimeError("distill_loss was called with grad disabled; its result cannot be backpropagated")
        out_hs = None if grad_hs is None else (grad_hs * grad_loss).to(ctx.dtypes[0])
        out_ws = None if grad_ws is None else (grad_ws * grad_loss).to(ctx.dtypes[1])
        return out_hs, out_ws, None, None, None, None, None, None, None, None


def _divergence_and_grad(
    student_logits: torch.Tensor,  # [chunk, vocab]  consumed (modified in place)
    teacher_logits: torch.Tensor,  # [chunk, vocab]  consumed
    divergence: str,
    temperature: float,
    beta: float,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token divergence [chunk] and its gradient w.r.t. the tempered student logits [chunk, vocab]."""
    if temperature != 1.0:
        student_logits.div_(temperature)
        teacher_logits.div_(temperature)
    log_q = student_logits.sub_(student_logits.logsumexp(-1, keepdim=True))  # student log-probs
    log_p = teacher_logits.sub_(teacher_logits.logsumexp(-1, keepdim=True))  # teacher log-probs
    q = log_q.exp()
    if divergence == "forward_kl":
        p = log_p.exp()
        div = (p * (log_p - log_q)).sum(-1)
        return div, (q.sub_(p) if want_grad else None)
    if divergence == "reverse_kl":
        g = log_q.sub_(log_p)  # log q - log p
    else:  # jsd: log m = logsumexp(log p + log beta, log q + log(1 - beta)), without a [2, chunk, vocab] stack
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kl_t = (log_p.exp() * (log_p - log_m)).sum(-1)  # KL(T || M)
        g = log_q.sub_(log_m)  # log q - log m
        div = beta * kl_t + (1 - beta) * (q * g).sum(-1)
        if not want_grad:
            return div, None
        g.mul_(1 - beta)
        return div, q.mul_(g.sub_((q * g).sum(-1, keepdim=True)))
    div = (q * g).sum(-1)
    if not want_grad:
        return div, None
    return div, q.mul_(g.sub_(div.unsqueeze(1)))


def distill_loss_reference(
    student_hidden: torch.Tensor,  # [tokens, hidden_s]
    student_head: torch.Tensor,  # [vocab, hidden_s]
    teacher_hidden: torch.Tensor,  # [tokens, hidden_t]
    teacher_head: torch.Tensor,  # [vocab, hidden_t]
    mask: torch.Tensor | None = None,  # [tokens]
    divergence: Divergence = "reverse_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    weights: torch.Tensor | None = None,  # [tokens]
) -> DistillLoss:
    """The naive version: full [tokens, vocab] logits for both models and plain autograd.

    Written independently of the chunked one (probabilities, not closed-form gradients) so that
    agreement between the two means something. Used by the tests and as the bench baseline.
    """
    _check(student_hidden, student_head, teacher_hidden, teacher_head, mask, divergence, temperature, beta, weights)
    dtype = _compute_dtype(student_hidden)
    n = student_hidden.shape[0]
    mask = torch.ones(n, dtype=torch.bool, device=student_hidden.device) if mask is None else mask.bool()
    if weights is not None:
        mask = mask & (weights != 0)
    log_q = torch.log_softmax((student_hidden.to(dtype) @ student_head.to(dtype).T) / temperature, -1)
    with torch.no_grad():
        log_p = torch.log_softmax((teacher_hidden.to(dtype) @ teacher_head.to(dtype).T) / temperature, -1)
    q, p = log_q.exp(), log_p.exp()
    if divergence == "reverse_kl":
        per_token = (q * (log_q - log_p)).sum(-1)
    elif divergence == "forward_kl":
        per_token = (p * (log_p - log_q)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        per_token = beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)
    per_token = per_token * mask
    loss = per_token.sum() / mask.sum().clamp(min=1) if weights is None else (per_token * weights.to(dtype)).sum()
    return DistillLoss(loss, per_token.detach())


def _token_weights(hs: torch.Tensor, mask: torch.Tensor | None, weights: torch.Tensor | None) -> torch.Tensor:
    """[tokens] the weight of each token in the loss: mask / mask.sum() (the mean), or `weights` where masked in."""
    dtype = _compute_dtype(hs)
    if weights is not None:
        return weights.to(dtype) if mask is None else weights.to(dtype) * mask.to(dtype)
    if mask is None:
        return torch.full((hs.shape[0],), 1 / max(hs.shape[0], 1), dtype=dtype, device=hs.device)
    return mask.to(dtype) / mask.sum().clamp(min=1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(hs, ws, ht, wt, mask, divergence, temperature, beta, weights=None) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1 (use forward_kl / reverse_kl for the ends), got {beta}")
    if hs.dim() != 2 or ht.dim() != 2 or hs.shape[0] != ht.shape[0]:
        raise ValueError(f"hidden states must be [tokens, hidden] with equal tokens, got {tuple(hs.shape)} and {tuple(ht.shape)}")
    if ws.shape != (ws.shape[0], hs.shape[1]) or wt.shape != (wt.shape[0], ht.shape[1]):
        raise ValueError(f"heads must be [vocab, hidden]: student {tuple(ws.shape)} vs hidden {hs.shape[1]}, "
                         f"teacher {tuple(wt.shape)} vs hidden {ht.shape[1]}")
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {ws.shape[0]} vs {wt.shape[0]}")
    if mask is not None and mask.shape != (hs.shape[0],):
        raise ValueError(f"mask must be [tokens] = [{hs.shape[0]}], got {tuple(mask.shape)}")
    if weights is not None and weights.shape != (hs.shape[0],):
        raise ValueError(f"weights must be [tokens] = [{hs.shape[0]}], got {tuple(weights.shape)}")
