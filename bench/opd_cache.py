"""Teacher cache: bytes per token (hidden states vs full logits) and streaming read throughput.

    python bench/opd_cache.py            # hidden 1024, vocab 32k, 32k response tokens (~30 s)

Both baselines are measured in the same run: a shard of full bf16 logits for the same tokens
(what a logits cache would store), and a plain read of the shard files followed by sha256 (the
least any reader that verifies every byte must spend; the reader adds parsing and batching).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from distill.cache import CacheReader, CacheWriter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--teachers", type=int, default=4)
    ap.add_argument("--shard-tokens", type=int, default=8192)
    ap.add_argument("--logit-tokens", type=int, default=1024, help="tokens in the logits baseline shard")
    args = ap.parse_args()
    torch.manual_seed(0)
    tokens = args.samples * args.response_len
    teachers = [{"name": f"t{i}", "path": f"/t{i}"} for i in range(args.teachers)]

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        with CacheWriter(root, 1, teachers, shard_rows=args.shard_tokens) as w:
            for i in range(args.samples):
                ids = torch.randint(0, args.vocab, (args.prompt_len + args.response_len,)).tolist()
                w.add(i * args.teachers // args.samples, f"s{i}", "d", ids, args.prompt_len,
                      torch.randn(args.response_len, args.hidden))
        write_s = time.perf_counter() - t0
        files = sorted(Path(root, "round_000001").iterdir())
        cache_bytes = sum(f.stat().st_size for f in files)

        logits = torch.randn(args.logit_tokens, args.vocab).bfloat16()
        logits_per_token = len(st_save({"logits": logits})) / args.logit_tokens

        t0 = time.perf_counter()
        raw = sum(len(f.read_bytes()) for f in files)
        raw_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for f in files:
            hashlib.sha256(f.read_bytes()).hexdigest()
        floor_s = time.perf_counter() - t0  # what any reader that verifies every byte must spend

        t0 = time.perf_counter()
        streamed = 0
        for batch in CacheReader(root, 1, batch_tokens=8192):
            streamed += batch.hidden.shape[0]
        read_s = time.perf_counter() - t0
        assert streamed == tokens

    per_token = cache_bytes / tokens
    print(f"{tokens} response tokens, {args.teachers} teachers, hidden {args.hidden} bf16, vocab {args.vocab}; "
          f"{len(files) - 1} shards + index, {cache_bytes / 2**20:.1f} MiB, written in {write_s:.2f} s")
    print(f"cache: {per_token:.0f} bytes/token (hidden states + token ids + index); "
          f"full bf16 logits: {logits_per_token:.0f} bytes/token")
    print(f"read: raw bytes {raw / 2**20 / raw_s:.0f} MB/s, raw + sha256 {raw / 2**20 / floor_s:.0f} MB/s, "
          f"CacheReader (sha256 + parse + batches) {cache_bytes / 2**20 / read_s:.0f} MB/s = {tokens / read_s:.0f} tokens/s")
    print(f"cache bytes per token, hidden states vs full logits: ratio {per_token / logits_per_token:.3f} (target <= 0.1)")
    print(f"streaming read throughput vs raw read + sha256: ratio {floor_s / read_s:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
