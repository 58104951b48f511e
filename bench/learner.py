"""Learner memory: token log-probs without a full fp32 [B, T, vocab], and FSDP2's per-worker state.

    python bench/learner.py                       # B=8, T=2048, vocab 32k, bf16 logits (~2 min, ~9 GiB peak)
    python bench/learner.py --batch 2 --seq 512   # quicker

1. Token log-probs.
The learner's case: bf16 logits from the model, token log-probs at the rollout temperature, then
backward through them. Naive is `log_softmax(logits.float() / t).gather(...)`: it keeps the fp32
copy and the full fp32 log-softmax for backward. Ours (`experts.grpo_loss.token_logprobs`) works
`LOGPROB_CHUNK` rows at a time and recomputes each chunk in backward, so beside the logits' own
gradient it holds one chunk. Each variant runs in its own subprocess (bench/support/memory.py); the peak
counted is above the resident set once the logits exist.

2. Sharding. A learner group of 1 and of 2 FSDP2 workers (Ray, gloo) takes one SFT step on the same
model (hidden 256, 4 layers, vocab 32k: ~13M parameters); each rank reports the bytes of parameters
and AdamW state it holds. With 2 workers each should hold about half.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support.memory import PeakDelta, in_subprocesses  # noqa: E402


def measure(variant: str, batch: int, seq: int, vocab: int, temperature: float) -> dict:
    import torch

    from experts.grpo_loss import token_logprobs

    torch.manual_seed(0)
    logits = torch.randn(batch, seq, vocab, dtype=torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, vocab, (batch, seq))
    advantages = torch.randn(batch, seq)

    def naive(x, tok):
        return torch.log_softmax(x.float() / temperature, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)

    fn = naive if variant == "naive" else (lambda x, tok: token_logprobs(x, tok, temperature))
    fn(logits[:1, :8], tokens[:1, :8]).sum().backward()  # warm up kernels and the allocator on a sliver
    logits.grad = None
    with PeakDelta() as mem:
        t0 = time.perf_counter()
        logp = fn(logits, tokens)
        (logp * advantages).sum().backward()  # a policy-gradient-shaped loss
        seconds = time.perf_counter() - t0
    return dict(variant=variant, peak_mib=mem.mib, exact_peak=mem.exact, seconds=seconds,
                logp_sum=float(logp.detach().double().sum()), grad_norm=float(logits.grad.float().norm()))


def sharded_state_bytes(workers_list=(1, 2)) -> dict[int, int]:
    """Per-worker parameter + optimizer-state bytes (the largest rank's) after one step, by worker count."""
    import tempfile

    import ray

    from experts import sft
    from experts.models import build_tiny_model, save_checkpoint, train_tokenizer
    from learner.config import LearnerConfig
    from learner.group import WorkerGroup

    root = Path(tempfile.mkdtemp(prefix="bench_learner_"))
    tok = train_tokenizer([f"{i} plus {i + 1} is {2 * i + 1}" for i in range(400)], vocab_size=400)
    model = build_tiny_model(tok, hidden_size=256, num_hidden_layers=4, intermediate_size=704, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=32768, tie_word_embeddings=False)
    save_checkpoint(model, tok, root / "base")
    rows = [(list(range(1, 33)), list(range(1, 33)))] * 4
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        for workers in workers_list:
            cfg = sft.Config(model=str(root / "base"), batch_size=2,
                             learner=LearnerConfig(workers=workers, cpus_per_worker=1 / workers))
            group = WorkerGroup(str(root / "base"), cfg.learner, sft.optim(cfg))
            sft.train_step(group, rows, cfg, tok.pad_token_id)
            per_rank = group.state_bytes()
            out[workers] = max(r["params"] + r["optimizer"] for r in per_rank)
            print(f"fsdp2 x{workers}: per-worker params + optimizer state {[r['params'] + r['optimizer'] for r in per_rank]} bytes")
            group.close()
    finally:
        ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)  # subprocess mode
    args = ap.parse_args()
    shape = dict(batch=args.batch, seq=args.seq, vocab=args.vocab, temperature=args.temperature)
    if args.variant:
        print(json.dumps(measure(args.variant, **shape)))
        return

    results = in_subprocesses(__file__, ("naive", "chunked"), shape)
    for variant, r in results.items():
        print(f"{variant:8s} fwd+bwd {r['seconds']:6.2f} s  peak +{r['peak_mib']:8.1f} MiB  sum log p {r['logp_sum']:.6e}  "
              f"|grad| {r['grad_norm']:.6f}  (exact peak: {r['exact_peak']})")
    naive, chunked = results["naive"], results["chunked"]
    full = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"shape: B={args.batch} T={args.seq} V={args.vocab}, bf16 logits, t={args.temperature}; "
          f"one fp32 [B, T, V] = {full:.0f} MiB")
    rel = abs(naive["logp_sum"] - chunked["logp_sum"]) / abs(naive["logp_sum"])
    print(f"agreement: relative |sum log p| difference {rel:.1e}, |grad| {naive['grad_norm']:.6f} vs {chunked['grad_norm']:.6f}")
    state = sharded_state_bytes()
    print(f"token log-prob peak memory vs naive log_softmax: ratio {chunked['peak_mib'] / naive['peak_mib']:.3f} "
          f"(target <= 0.25)")
    print(f"per-worker parameter + optimizer-state bytes, 2 FSDP2 workers vs 1: ratio {state[2] / state[1]:.3f} "
          f"(target <= 0.55)")


if __name__ == "__main__":
    main()
