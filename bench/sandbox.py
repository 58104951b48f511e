"""Warm pool vs cold `docker run --rm`, same snippet, same run.

Three ways to run one small Python snippet, each with the same hardening flags:
  cold        `docker run --rm IMAGE python3 -c SNIPPET` per call (the baseline)
  docker exec a warm container, one `docker exec` (Python SDK, straight to the socket) per call:
              what a pool without the in-container server would cost (our "before")
  pool        `SandboxPool.run`: one JSON request over the container's attached stdin to its
              PID-1 exec server, plus the reset that wipes /work between calls (our "after")
Throughput uses `--workers` concurrent callers (default 2, the pool size); latency percentiles come
from one caller in sequence. Usage: python bench/sandbox.py [--cold N] [--pool N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Run as `python bench/sandbox.py`, this file's folder comes first on sys.path and its name would
# shadow the `sandbox` package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from sandbox import DEFAULT_IMAGE, Limits, SandboxPool  # noqa: E402
from sandbox.container import docker_client  # noqa: E402

SNIPPET = "print(sum(i * i for i in range(1000)))"
EXPECTED = f"{sum(i * i for i in range(1000))}\n"
HARDENING = ["--network", "none", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
             "--user", "65534:65534", "--pids-limit", "128", "--memory", "512m", "--memory-swap", "512m",
             "--cpus", "1", "--tmpfs", "/work:size=64m", "--label", "opd.sandbox.bench=1"]


def throughput(fn, n: int, workers: int) -> float:
    """Calls per second of `fn` over n calls from `workers` threads."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        for out in ex.map(lambda _: fn(), range(n)):
            assert out == EXPECTED, out
    return n / (time.perf_counter() - t0)


def latencies_ms(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert fn() == EXPECTED
        out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--cold", type=int, default=16, help="cold docker run calls")
    ap.add_argument("--exec", dest="n_exec", type=int, default=60, help="warm docker exec calls")
    ap.add_argument("--pool", type=int, default=300, help="pool calls")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    def cold() -> str:
        cmd = ["docker", "run", "--rm", *HARDENING, args.image, "python3", "-c", SNIPPET]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    with SandboxPool(size=args.workers, image=args.image, limits=Limits()) as pool:
        def pooled() -> str:
            return pool.run(SNIPPET).stdout

        # Baseline "before": the same warm container hardening, but a fresh docker exec per call.
        client = docker_client()
        box = client.containers.run(args.image, ["sleep", "infinity"], detach=True, remove=True,
                                    network_mode="none", read_only=True, cap_drop=["ALL"], user="65534:65534",
                                    labels={"opd.sandbox.bench": "1"})

        def docker_exec() -> str:
            return box.exec_run(["python3", "-c", SNIPPET]).output.decode()

        try:
            pooled(), docker_exec(), cold()  # warm caches (image layers, python bytecode)
            cold_tp = throughput(cold, args.cold, args.workers)
            exec_tp = throughput(docker_exec, args.n_exec, args.workers)
            pool_tp = throughput(pooled, args.pool, args.workers)
            exec_lat = latencies_ms(docker_exec, args.n_exec // 2)
            pool_lat = latencies_ms(pooled, args.pool // 2)
        finally:
            box.remove(force=True)

    print(f"snippet: {SNIPPET!r}, {args.workers} concurrent callers")
    print(f"cold docker run --rm : {cold_tp:7.1f} exec/s")
    print(f"warm docker exec     : {exec_tp:7.1f} exec/s  p50 {pct(exec_lat, 50):6.1f} ms  p95 {pct(exec_lat, 95):6.1f} ms")
    print(f"pool (exec server)   : {pool_tp:7.1f} exec/s  p50 {pct(pool_lat, 50):6.1f} ms  p95 {pct(pool_lat, 95):6.1f} ms")
    print(f"(before the exec server: warm docker exec was {exec_tp / cold_tp:.1f}x cold docker run)")
    print(f"pool vs cold docker run throughput: ratio {pool_tp / cold_tp:.1f} (target >= 20)")
    print(f"pool p50 exec latency in ms: ratio {pct(pool_lat, 50):.1f} (target < 50)")
    print(f"pool p95 exec latency in ms: ratio {pct(pool_lat, 95):.1f} (target < 100)")


if __name__ == "__main__":
    main()
