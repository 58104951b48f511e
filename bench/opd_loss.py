"""Peak memory and time of the chunked distillation loss vs the naive full-logits one (forward + backward).

    python bench/opd_loss.py                    # vocab 32k, hidden 1024, 8k tokens (~1-2 min on 2 cores)
    python bench/opd_loss.py --tokens 2048      # quicker

Each variant runs in its own subprocess, so one's allocations cannot hide the other's. Peak memory is
the process's peak resident set during forward + backward minus its resident set just before (the
peak is reset through /proc/self/clear_refs; where that is not allowed, ru_maxrss is used, which
only over-states the delta). tracemalloc would see none of it: torch allocates outside Python.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support.memory import PeakDelta, in_subprocesses  # noqa: E402


def measure(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, divergence: str, repeats: int) -> dict:
    import torch

    from distill.loss import distill_loss, distill_loss_reference

    torch.manual_seed(0)
    hs = (torch.randn(tokens, hidden) / hidden**0.5).requires_grad_()
    ws = (torch.randn(vocab, hidden) * 0.5).requires_grad_()
    ht = (torch.randn(tokens, hidden) / hidden**0.5).bfloat16()  # as cached
    wt = torch.randn(vocab, hidden) * 0.5
    mask = torch.rand(tokens) > 0.1

    def step(n):
        if variant == "naive":
            out = distill_loss_reference(hs[:n], ws, ht[:n], wt, mask[:n], divergence=divergence)
        else:
            out = distill_loss(hs[:n], ws, ht[:n], wt, mask[:n], divergence=divergence, chunk_size=chunk)
        out.loss.backward()
        return out.loss.item()

    step(64)  # warm up kernels and the allocator on a sliver
    hs.grad = ws.grad = None
    with PeakDelta() as mem:
        t0 = time.perf_counter()
        loss = step(tokens)
        seconds = time.perf_counter() - t0
    for _ in range(repeats - 1):  # the machine is shared: the best of a few runs is the honest time
        hs.grad = ws.grad = None
        t0 = time.perf_counter()
        step(tokens)
        seconds = min(seconds, time.perf_counter() - t0)
    return dict(variant=variant, loss=loss, seconds=seconds, peak_mib=mem.mib, exact_peak=mem.exact,
                grad_norm=float(hs.grad.norm()), head_grad_norm=float(ws.grad.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=512, help="distill_loss chunk_size (its default)")
    ap.add_argument("--divergence", default="reverse_kl")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant; the fastest counts")
    ap.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)  # subprocess mode
    args = ap.parse_args()
    shape = dict(tokens=args.tokens, vocab=args.vocab, hidden=args.hidden, chunk=args.chunk, divergence=args.divergence,
                 repeats=args.repeats)
    if args.variant:
        print(json.dumps(measure(args.variant, **shape)))
        return

    results = in_subprocesses(__file__, ("naive", "chunked"), shape)
    for variant, r in results.items():
        print(f"{variant:8s} loss {r['loss']:.6f}  fwd+bwd {r['seconds']:6.2f} s (best of {args.repeats})  peak +{r['peak_mib']:8.1f} MiB  "
              f"|grad h| {r['grad_norm']:.6f}  |grad W| {r['head_grad_norm']:.6f}  (exact peak: {r['exact_peak']})")
    naive, chunked = results["naive"], results["chunked"]
    print(f"shape: {args.tokens} tokens x {args.vocab} vocab x {args.hidden} hidden, {args.divergence}, "
          f"chunk {args.chunk}; one [tokens, vocab] fp32 tensor = {args.tokens * args.vocab * 4 / 2**20:.0f} MiB")
    print(f"loss agreement: |naive - chunked| = {abs(naive['loss'] - chunked['loss']):.2e}")
    print(f"chunked loss peak memory vs naive: ratio {chunked['peak_mib'] / naive['peak_mib']:.3f} (target <= 0.1)")
    print(f"chunked loss time vs naive: ratio {chunked['seconds'] / naive['seconds']:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
