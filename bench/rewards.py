"""Reward throughput on this machine, each against a baseline measured in the same run.

    python bench/rewards.py [--groups 32] [--group-size 8] [--code-samples 64] [--pool-size 4]

math: GRPO-shaped batches (`group-size` completions per prompt, sharing the gold answer and often
the same final answer); `MathReward` on the batch vs `math_correct` one sample at a time.
math-verify's internal parse caches are cleared before each arm so neither inherits the other's.
code: `CodeReward` through a warm sandbox pool, the batch concurrently vs the same samples one at
a time through the same pool. Needs Docker and the sandbox image.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/rewards.py`: this folder must not shadow the `rewards` package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from rewards.code_tests import CodeReward
from rewards.math_answer import MathReward, math_correct

# (gold, equivalent forms a model might write, wrong answers a model might write)
PROBLEMS = [
    ("\\frac{1}{2}", ["0.5", "1/2", "\\frac12"], ["2", "0.25"]),
    ("\\sqrt{2}/2", ["\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"], ["\\sqrt{2}", "1.41"]),
    ("[1, 3)", ["[1,3)"], ["(1,3]", "[1,3]"]),
    ("\\{2, 5\\}", ["\\{5,2\\}", "\\{2,5\\}"], ["\\{2\\}", "\\{2,5,7\\}"]),
    ("x^2 - 1", ["(x-1)(x+1)", "(x+1)(x-1)"], ["x^2+1", "(x-1)^2"]),
    ("3\\pi", ["3 \\pi", "\\pi \\cdot 3"], ["3", "\\pi"]),
    ("12", ["12.0", "12"], ["13", "-12"]),
    ("\\frac{7}{3}", ["7/3", "2\\frac{1}{3}"], ["2.33", "3/7"]),
]


def math_batches(groups: int, group_size: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for g in range(groups):
        gold, right, wrong = PROBLEMS[g % len(PROBLEMS)]
        for k in range(group_size):
            ans = rng.choice(right if rng.random() < 0.6 else wrong)
            body = f"<think>\nworking on problem {g}, try {k}\n</think>\nThe answer is $\\boxed{{{ans}}}$."
            samples.append({"id": f"{g}-{k}", "completion": body, "answer": gold})
    return samples


def clear_math_verify_caches() -> None:
    from math_verify import parser

    for name in dir(parser):
        fn = getattr(parser, name)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


def bench_math(groups: int, group_size: int) -> float:
    samples = math_batches(groups, group_size)
    MathReward()(samples[:4])  # import sympy's lazy parts before timing either arm
    clear_math_verify_caches()
    t0 = time.perf_counter()
    base = [float(math_correct(s["completion"], s["answer"])) for s in samples]
    t_base = time.perf_counter() - t0
    clear_math_verify_caches()
    t0 = time.perf_counter()
    batched = [r.score for r in MathReward()(samples)]
    t_batch = time.perf_counter() - t0
    assert base == batched, "batched and one-at-a-time scores differ"
    n = len(samples)
    print(f"math: {n} samples, accuracy {sum(batched) / n:.2f}")
    print(f"  one at a time (math_correct): {n / t_base:8.1f} samples/s")
    print(f"  batched (MathReward):         {n / t_batch:8.1f} samples/s")
    return t_base / t_batch


def code_samples(n: int) -> list[dict]:
    tests = ["assert fib(0) == 0", "assert fib(1) == 1", "assert fib(10) == 55", "assert fib(20) == 6765"]
    good = "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    bad = "def fib(n):\n    return n\n"
    return [{"id": i, "completion": f"```python\n{good if i % 3 else bad}```", "meta": {"tests": tests}}
            for i in range(n)]


def bench_code(n: int, pool_size: int) -> float:
    from sandbox import SandboxPool

    samples = code_samples(n)
    with SandboxPool(size=pool_size) as pool:
        reward = CodeReward(pool=pool, mode="fraction")
        reward(samples[:pool_size])  # warm every container once
        t0 = time.perf_counter()
        serial = [reward.score_one(s).score for s in samples]
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        batched = [r.score for r in reward(samples)]
        t_batch = time.perf_counter() - t0
    assert serial == batched, "concurrent and serial scores differ"
    print(f"code: {n} samples, pool of {pool_size}, mean score {sum(batched) / n:.2f}")
    print(f"  serial through the pool:  {n / t_serial:8.1f} samples/s")
    print(f"  concurrent (CodeReward):  {n / t_batch:8.1f} samples/s")
    return t_serial / t_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--code-samples", type=int, default=64)
    ap.add_argument("--pool-size", type=int, default=4)
    args = ap.parse_args()
    math_ratio = bench_math(args.groups, args.group_size)
    code_ratio = bench_code(args.code_samples, args.pool_size)
    print(f"math reward throughput, batched vs one-at-a-time: ratio {math_ratio:.2f} (target >= 1.5)")
    # Each exec is CPU-bound (a Python start in the container), so concurrency can at best use the
    # cores: about 2x on the 2-core dev box, less while other work shares it. More cores, more.
    print(f"code reward throughput, pool concurrency vs serial: ratio {code_ratio:.2f} (target >= 1.2)")


if __name__ == "__main__":
    main()
