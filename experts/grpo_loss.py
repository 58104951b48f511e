"""GRPO's math as pure functions: group advantages, the clipped policy loss, KL estimators, entropy.

Shapes: B sequences, T positions (the response tokens of each row, right-padded), V vocabulary,
G samples per prompt. Every per-token tensor comes with a `mask` [B, T] (1.0 where the token is
the model's own and counts in the loss; 0.0 on padding, prompt and tool-result tokens).

References:
- GRPO: Shao et al. 2024, "DeepSeekMath" (group-normalised advantages, k3 KL in the loss).
- Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training" (drop the std division).
- DAPO: Yu et al. 2025 (token-level aggregation, clip-higher, dynamic sampling, overlong shaping).
- k1/k2/k3 estimators: Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html;
  as loss terms: Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL", and
  Zhang et al. 2025, "On the design of KL-regularized policy gradient algorithms for LLM reasoning".
"""

from __future__ import annotations

import math
from typing import Literal

import torch

LossAgg = Literal["token_mean", "seq_mean"]
RewardScale = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k2", "k3"]


def group_advantages(rewards: torch.Tensor, scale: RewardScale = "group", mask: torch.Tensor | None = None,
                     eps: float = 1e-6) -> torch.Tensor:
    """Each sample's reward relative to its group's mean, scaled.  [groups, G] -> [groups, G]

    scale: `group` divides by the group's std, `(r - mean) / (std + eps)` (GRPO); `batch` by the std
    of every counted reward of the batch (TRL's `scale_rewards="batch"`, as in REINFORCE++): a group
    whose rewards differ only by a little (a 0.1-weight format reward while the checker ties) keeps
    small advantages instead of being blown up to +-1; `none` leaves them centred (Dr. GRPO, Liu et
    al. 2025, sec. 3.1: the group std up-weights near-solved and near-failed prompts, a difficulty bias).
    std is the unbiased one, as in DeepSeekMath, verl and TRL.

    mask [groups, G] (bool): the samples that count; the others (a reward that failed to score) are
    left out of the mean and std and get advantage 0. A group with fewer than 2 counted samples gets 0.

    >>> group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))  # mean 0.5, std 0.577
    tensor([[ 0.8660, -0.8660, -0.8660,  0.8660]])
    >>> group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), scale="none")
    tensor([[ 0.5000, -0.5000, -0.5000,  0.5000]])
    >>> group_advantages(torch.tensor([[1.0, 0.0, 9.0]]), mask=torch.tensor([[True, True, False]]))
    tensor([[ 0.7071, -0.7071,  0.0000]])
    """
    m = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    w = m.to(rewards.dtype)
    n = w.sum(-1, keepdim=True)
    mean = (rewards * w).sum(-1, keepdim=True) / n.clamp(min=1)
    centred = (rewards - mean) * w * (n >= 2)
    if scale == "none":
        return centred
    if scale == "group":
        std = ((centred**2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    elif scale == "batch":
        counted = rewards[m]
        std = counted.std() if counted.numel() > 1 else rewards.new_zeros(())
    else:
        raise ValueError(f"unknown reward scaling {scale!r}")
    return centred / (std + eps)


def informative_groups(rewards: torch.Tensor, mask: torch.Tensor | None = None, tol: float = 1e-6) -> torch.Tensor:
    """Groups with at least 2 counted samples whose rewards are not all tied (spread above `tol`).
    [groups, G] -> bool [groups]

    A group where every sample scores the same has zero advantage everywhere, so it adds no
    gradient, only noise in the normalisation; DAPO's dynamic sampling drops such groups. `mask`
    as in `group_advantages`: uncounted samples neither break nor make a tie.

    >>> informative_groups(torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
    tensor([False,  True, False])
    >>> informative_groups(torch.tensor([[0.0, 1.0, 1.0]]), mask=torch.tensor([[False, True, True]]))
    tensor([False])
    """
    m = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    hi = rewards.masked_fill(~m, -math.inf).max(dim=-1).values
    lo = rewards.masked_fill(~m, math.inf).min(dim=-1).values
    return (m.sum(-1) >= 2) & (hi - lo > tol)


def overlong_penalty(lengths: torch.Tensor, max_len: int | torch.Tensor, buffer: int,
                     penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward.  [B] -> [B]

    0 up to `max_len - buffer` tokens, then falling linearly to `-penalty` at `max_len`. `max_len`
    may be one budget per sample ([B]: an agent episode's and each domain's own); where a budget is
    shorter than `buffer`, the ramp spans the whole budget.

    >>> overlong_penalty(torch.tensor([10, 12, 14, 16]), max_len=16, buffer=4)
    tensor([ 0.0000,  0.0000, -0.5000, -1.0000])
    >>> overlong_penalty(torch.tensor([14, 14, 2]), max_len=torch.tensor([16, 64, 4]), buffer=4)
    tensor([-0.5000,  0.0000, -0.5000])
    """
    max_len = torch.as_tensor(max_len, dtype=torch.float)
    start = (max_len - buffer).clamp(min=0)
    over = (lengths.float() - start).clamp(min=0) / (max_len - start).clamp(min=1)
    return 0.0 - penalty * over.clamp(max=1.0)  # 0.0 - x, so no -0.0


LOGPROB_CHUNK = 1024  # rows of [rows, vocab] fp32 alive at once: 128 MiB at a 32k vocabulary


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """log pi(token) under `softmax(logits / temperature)`.  logits [B, T, V], tokens [B, T] -> [B, T] fp32

    The rollout samples at `temperature`, so the policy being optimised is the tempered one
    (verl does the same); rollout and learner must use the same temperature here.

    Never builds a full fp32 [B, T, V]: `chunk` rows at a time it gathers the token's logit and
    subtracts the row's logsumexp (TRL's `selective_log_softmax`, verl's `logprobs_from_logits`).
    Backward is written out, (onehot(token) - softmax) / temperature per chunk, into one gradient in
    the logits' own dtype, so autograd keeps no [B, T, V] intermediate either.
    """
    shape = tokens.shape
    flat, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenLogprobs.apply(flat, flat_tokens, temperature, chunk).reshape(shape)
    return _logprobs_and_lse(flat, flat_tokens, temperature, chunk)[0].reshape(shape)


def _logprobs_and_lse(flat: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk: int):
    """([rows] log-probs, [rows] logsumexp of logits / temperature), both fp32, `chunk` rows at a time."""
    logp = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    lse = torch.empty_like(logp)
    for i in range(0, flat.shape[0], chunk):
        x = flat[i : i + chunk].to(torch.float32, copy=True).div_(temperature)  # [rows, V]: one fp32 chunk
        lse[i : i + chunk] = x.logsumexp(-1)
        logp[i : i + chunk] = x.gather(-1, tokens[i : i + chunk, None]).squeeze(-1) - lse[i : i + chunk]
    return logp, lse


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat, tokens, temperature, chunk):
        with torch.no_grad():
            logp, lse = _logprobs_and_lse(flat, tokens, temperature, chunk)
        ctx.save_for_backward(flat, tokens, lse)  # the logits themselves, not a copy
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp

    @staticmethod
    def backward(ctx, grad_out):  # d logp / d logits = (onehot(token) - softmax(logits / t)) / t
        flat, tokens, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(flat)
        for i in range(0, flat.shape[0], chunk):
            g = grad_out[i : i + chunk, None].float()
            p = flat[i : i + chunk].to(torch.float32, copy=True).div_(t).sub_(lse[i : i + chunk, None]).exp_()
            d = p.mul_(-g).scatter_add_(-1, tokens[i : i + chunk, None], g).div_(t)
            grad[i : i + chunk] = d
        return grad, None, None, None


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """Entropy of the tempered next-token distribution.  [B, T, V] -> [B, T] fp32

    `chunk` rows at a time; with gradients each chunk is recomputed in backward (activation
    checkpointing), so no fp32 [B, T, V] is kept.
    """
    from torch.utils.checkpoint import checkpoint

    flat = logits.reshape(-1, logits.shape[-1])
    grad = torch.is_grad_enabled() and logits.requires_grad
    out = [checkpoint(_entropy, x, temperature, use_reentrant=False) if grad else _entropy(x, temperature)
           for x in flat.split(chunk)]
    return torch.cat(out).reshape(logits.shape[:-1]) if out else flat.new_zeros(logits.shape[:-1], dtype=torch.float32)


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [rows, V]
    return -(logp.exp() * logp).sum(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k2") -> torch.Tensor:
    """Per-token KL-to-reference term from log pi and log ref of the sampled tokens.  [B, T] -> [B, T]

    With d = logp - ref_logp (Schulman 2020's estimators of KL(pi || ref) for tokens sampled from pi):
      k1 = d             unbiased value; as a loss its expected gradient is 0: it regularises nothing
      k2 = d^2 / 2       biased value, but its expected gradient is exactly that of KL(pi || ref)
      k3 = e^-d + d - 1  unbiased, never negative value (DeepSeekMath eq. 4, verl's `low_var_kl`);
                         as a loss its expected gradient is that of the other direction, KL(ref || pi)
    (Tang & Munos 2025; Zhang et al. 2025). d is clamped to [-20, 20] as verl does, so one wild
    token cannot overflow exp.

    >>> kl_penalty(torch.tensor([0.0, 0.0]), torch.tensor([0.0, -1.0]), "k3")  # e^-1 + 1 - 1 = 0.3679
    tensor([0.0000, 0.3679])
    >>> kl_penalty(torch.tensor([0.0, 0.0]), torch.tensor([0.0, -1.0]), "k2")
    tensor([0.0000, 0.5000])
    """
    d = (logp - ref_logp).clamp(-20.0, 20.0)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(-d) + d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: LossAgg, normaliser: float | None = None) -> torch.Tensor:
    """Reduce per-token values [B, T] to a scalar.

    token_mean (DAPO, the default): sum over every unmasked token / number of such tokens, so a
      long response weighs in proportion to its length and long wrong answers are not diluted.
    seq_mean (original GRPO): mean over each row's tokens, then mean over rows.

    `normaliser` replaces the denominator (tokens or rows) by the count over the whole mini-batch,
    so gradient accumulation over micro-batches gives exactly the full mini-batch's gradient.
    """
    mask = mask.to(values.dtype)
    if how == "token_mean":
        denom = normaliser if normaliser is not None else mask.sum().clamp(min=1.0)
        return (values * mask).sum() / denom
    if how == "seq_mean":
        per_row = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        denom = normaliser if normaliser is not None else values.shape[0]
        return per_row.sum() / denom
    raise ValueError(f"unknown loss aggregation {how!r}")


def next_token_logprobs(model, mb: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log pi of every next token of a micro-batch at `temperature`, [b, l-1] (a learner `forward` function).

    A loss-computing wrapper (OPD's student, `inner` = the HF model) is called through its own forward,
    in its plain-LM mode: under FSDP2 every forward must enter through the root module.
    """
    if hasattr(model, "inner"):
        return model(mb, None, temperature)
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits[:, :-1]
    return token_logprobs(logits, mb["input_ids"][:, 1:], temperature)


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling: min(pi_learner_old / pi_rollout, cap) per token, detached.

    The rollout engine (vLLM's kernels, bf16) samples from a slightly different policy than the
    learner scores; weighting each token's policy-gradient term by this ratio corrects the bias, and
    the cap bounds the variance (Yao et al. 2025; verl's rollout correction, TRL's vLLM IS).

    >>> truncated_is_weights(torch.tensor([0.0, 0.0]), torch.tensor([0.0, -5.0]), 2.0)
    tensor([1., 2.])
    """
    return torch.exp((old_logp - rollout_logp).detach().clamp(-20.0, 20.0)).clamp(max=cap)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    agg: LossAgg = "token_mean",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    normaliser: float | None = None,
    is_weights: torch.Tensor | None = None,
    kl_estimator: KLEstimator = "k2",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate with an optional KL-to-reference penalty; returns (loss, detached stats).

    logp, old_logp, mask, ref_logp: [B, T]; advantages: [B] (one per sequence, broadcast over
    its tokens) or [B, T]. Per token, with ratio = exp(logp - old_logp):

        pg = w * max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)) + kl_coef * kl(logp, ref)

    where w is the truncated importance weight (`is_weights`, [B, T]; 1 when None) and kl the
    `kl_estimator` (`kl_penalty`).

    Asymmetric clipping is DAPO's clip-higher: a larger `clip_high` lets low-probability tokens
    with positive advantage grow, which keeps entropy from collapsing. stats: `clip_frac` (tokens
    where the clipped branch is taken), `kl` (mean of the estimator), `ratio_mean`, all over unmasked tokens.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = kl_penalty(logp, ref_logp, kl_estimator) if ref_logp is not None else torch.zeros_like(logp)
    if ref_logp is not None and kl_coef:
        per_token = per_token + kl_coef * kl
    loss = aggregate(per_token, mask, agg, normaliser)
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1.0)
    with torch.no_grad():
        stats = {
            "clip_frac": ((clipped > unclipped).to(m.dtype) * m).sum() / n,
            "kl": (kl.detach() * m).sum() / n,
            "ratio_mean": (ratio.detach() * m).sum() / n,
        }
    return loss, stats
