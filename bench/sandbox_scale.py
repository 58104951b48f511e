"""N concurrent sandbox sessions from one warm pool: acquire and exec latency, memory, leaks.

For each N (default 64, 128, 256) one `SandboxPool(size=N)` is warmed to N containers, then for
`--rounds` rounds N threads, released together, each
  acquire  `pool.open_session()`: a container from the warm pool (the figure with a target);
  exec     one shell command in its session while the other N-1 sessions run theirs;
  release  `pool.close_session()`: the reset that makes the container reusable.
The baselines come from the same run and the same pool: a cold start alone (what an acquire costs
when the pool has no idle container: the first `--alone` starts, one at a time, while warming) and
the exec latency of one session alone.

Warming goes through the public API in waves: `--wave` sessions opened at once (each starts its
container, at most `--max-starting` at a time), held until N are held, then all released to the
pool. The memory of an idle sandbox is read while all N sit idle: the container's cgroup
(`memory.usage_in_bytes` on cgroup v1, `memory.current` on v2; what its limit counts), the PSS of
its containerd-shim process, and the growth of dockerd + containerd and of this process, per
container. After the pool closes, containers left are counted with
`docker ps -a --filter label=opd.sandbox.pool=<id>` (this pool's) and `label=opd.sandbox` (anyone's).
Every container this run started is removed on the way out, on error and on Ctrl-C too.
Last, `--ray-sessions` sessions go through one Ray pool actor (`serve_pool`, the per-node
service): the latency of a call through Ray and the calls per second one actor serves.

Usage: python bench/sandbox_scale.py [--sizes 64 128 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# Run as `python bench/sandbox_scale.py`, this file's folder comes first on sys.path and
# bench/sandbox.py would shadow the `sandbox` package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from sandbox import DEFAULT_IMAGE, Limits, SandboxPool  # noqa: E402
from sandbox.container import LABEL, SandboxError, docker_client  # noqa: E402

COMMAND = "echo ok"
ACQUIRE_TARGET_MS = 50.0
SESSIONS_TARGET = 256
MiB = 1 << 20
WORKER = "scale-worker"  # the name of every thread that calls the pool


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (inclusive method: with 64 samples p99 is close to the maximum)."""
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def labelled(label: str) -> list[str]:
    """Ids of containers carrying `label` (running or not), as `docker ps -a --filter` lists them."""
    out = subprocess.run(["docker", "ps", "-aq", "--no-trunc", "--filter", f"label={label}"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def image_mb(image: str) -> float:
    out = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", image],
                         capture_output=True, text=True, check=True)
    return int(out.stdout) / 1e6


def remove_all(label: str) -> int:
    ids = labelled(label)
    for i in range(0, len(ids), 64):
        subprocess.run(["docker", "rm", "-f", *ids[i:i + 64]], capture_output=True, text=True)
    return len(ids)


def run_threads(n: int, fn, deadline_s: float) -> list:
    """Run fn(i) in n threads released together; returns each result or the exception it raised."""
    out: list = [None] * n
    gate = threading.Barrier(n + 1)

    def body(i: int) -> None:
        gate.wait()
        try:
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 -- reported per thread by the caller
            out[i] = e

    threads = [threading.Thread(target=body, args=(i,), name=f"{WORKER}-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    gate.wait()
    end = time.monotonic() + deadline_s
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"{sum(t.is_alive() for t in threads)}/{n} threads still busy after {deadline_s:.0f}s")
    return out


def timed(fn):
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        r = fn(*a, **kw)
        return r, (time.perf_counter() - t0) * 1000
    return wrapper


def failures(results: list) -> list[BaseException]:
    return [r for r in results if isinstance(r, BaseException)]


# -- memory ------------------------------------------------------------------------------------
def cgroup_bytes(cid: str) -> int | None:
    """Memory charged to the container's cgroup (cgroupfs driver, v1 or v2), or None if not found."""
    for p in (f"/sys/fs/cgroup/memory/docker/{cid}/memory.usage_in_bytes",
              f"/sys/fs/cgroup/docker/{cid}/memory.current",
              f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/memory.current",
              f"/sys/fs/cgroup/memory/system.slice/docker-{cid}.scope/memory.usage_in_bytes"):
        try:
            return int(Path(p).read_text())
        except OSError:
            continue
    return None


def docker_stats_bytes(ids: list[str]) -> dict[str, int]:
    """Fallback when the cgroup files are out of reach: `docker stats --no-stream` (usage less cache)."""
    units = {"B": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30}
    out = subprocess.run(["docker", "stats", "--no-stream", "--no-trunc", "--format", "{{.ID}} {{.MemUsage}}", *ids],
                         capture_output=True, text=True, check=True).stdout
    got = {}
    for line in out.splitlines():
        cid, usage = line.split()[0], line.split()[1]
        num = usage.rstrip("KMGiB")
        got[cid] = int(float(num) * units[usage[len(num):]])
    return got


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def processes() -> dict[int, str]:
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                procs[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return procs


def daemons_rss() -> int:
    """RSS of dockerd and containerd (0 where they run outside this pid namespace)."""
    return sum(rss_bytes(pid) for pid, cmd in processes().items()
               if cmd.split(" ")[0].rsplit("/", 1)[-1] in ("dockerd", "containerd"))


def cpu_seconds(ids: list[str]) -> dict[str, float]:
    """CPU seconds used so far by the containers (cgroup cpuacct), their containerd-shims and
    dockerd + containerd; a key is missing where its counters are out of reach."""
    tick = os.sysconf("SC_CLK_TCK")

    def proc_cpu(pid: int) -> float:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / tick
        except (OSError, IndexError):
            return 0.0

    out = {}
    usage = []
    for cid in ids:
        for p in (f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage", f"/sys/fs/cgroup/docker/{cid}/cpu.stat"):
            try:
                text = Path(p).read_text()
            except OSError:
                continue
            usage.append(int(text) / 1e9 if p.endswith("usage") else int(text.split()[1]) / 1e6)
            break
    if len(usage) == len(ids):
        out["containers"] = sum(usage)
    wanted = set(ids)
    procs = processes()
    out["shims"] = sum(proc_cpu(pid) for pid, cmd in procs.items()
                       if "containerd-shim" in cmd and set(cmd.split()) & wanted)
    out["daemons"] = sum(proc_cpu(pid) for pid, cmd in procs.items()
                         if cmd.split(" ")[0].rsplit("/", 1)[-1] in ("dockerd", "containerd"))
    return out


def idle_cpu(ids: list[str], window_s: float) -> dict[str, float]:
    """Share of one core used by idle sandboxes over `window_s`, per part (containers, shims, daemons)."""
    a = cpu_seconds(ids)
    time.sleep(window_s)
    b = cpu_seconds(ids)
    return {k: (b[k] - a[k]) / window_s for k in a if k in b}


def idle_memory(ids: list[str]) -> dict:
    """Per-container memory of idle sandboxes: cgroup charge and containerd-shim PSS (MiB lists)."""
    cg = {cid: cgroup_bytes(cid) for cid in ids}
    source = "cgroup"
    if any(v is None for v in cg.values()):
        cg, source = docker_stats_bytes(ids), "docker stats"
    wanted = set(ids)
    shims = [pss_bytes(pid) for pid, cmd in processes().items()
             if "containerd-shim" in cmd and (set(cmd.split()) & wanted)]
    return {"source": source, "cgroup": [cg[c] / MiB for c in ids if c in cg], "shim": [s / MiB for s in shims]}


# -- one size ----------------------------------------------------------------------------------
def warm(pool: SandboxPool, n: int, wave: int, alone: int, deadline_s: float) -> tuple[list[float], list[float]]:
    """Start n containers through the public API: sessions opened `alone` one at a time, then a wave
    at a time, all held until n are, then released to the pool. Returns the open latencies in ms
    (cold starts) of the lone opens and of the waves (queued behind the other starts of their wave)."""
    held: list[str] = []
    lone: list[float] = []
    starts: list[float] = []
    try:
        for _ in range(min(alone, n)):
            sid, ms = timed(pool.open_session)()
            held.append(sid)
            lone.append(ms)
        while len(held) < n:
            k = min(wave, n - len(held))
            res = run_threads(k, lambda _: timed(pool.open_session)(), deadline_s)
            ok = [r for r in res if not isinstance(r, BaseException)]
            held += [sid for sid, _ in ok]
            starts += [ms for _, ms in ok]
            if bad := failures(res):
                raise SandboxError(f"warming to {n}: {len(bad)}/{k} starts failed with {len(held)} up: {bad[0]}")
    finally:
        for sid in held:
            pool.close_session(sid)
    return lone, starts


def serial_exec_ms(pool: SandboxPool, calls: int) -> list[float]:
    sid = pool.open_session()
    try:
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter()
            r = pool.session_call(sid, "exec", cmd=COMMAND)
            lat.append((time.perf_counter() - t0) * 1000)
            assert r["stdout"] == "ok\n", r
        return lat
    finally:
        pool.close_session(sid)


def one_round(pool: SandboxPool, n: int, deadline_s: float) -> dict:
    """N sessions acquired at once, one command each at once, all released at once."""
    acq = run_threads(n, lambda _: timed(pool.open_session)(), deadline_s)
    sids = [r[0] for r in acq if not isinstance(r, BaseException)]
    try:
        t0 = time.perf_counter()
        exe = run_threads(len(sids), lambda i: timed(pool.session_call)(sids[i], "exec", cmd=COMMAND), deadline_s)
        exec_wall = time.perf_counter() - t0
    finally:
        rel = run_threads(len(sids), lambda i: timed(pool.close_session)(sids[i]), deadline_s)
    ok_exec = [r for r in exe if not isinstance(r, BaseException) and r[0]["stdout"] == "ok\n"]
    return {
        "live": len(ok_exec),
        "acquire": [ms for _, ms in (r for r in acq if not isinstance(r, BaseException))],
        "exec": [ms for _, ms in ok_exec], "exec_wall": exec_wall,
        "release": [ms for _, ms in (r for r in rel if not isinstance(r, BaseException))],
        "errors": failures(acq) + failures(exe) + failures(rel)
        + [RuntimeError(str(r[0])) for r in exe if not isinstance(r, BaseException) and r[0]["stdout"] != "ok\n"],
    }


def measure(n: int, args, pools: list[SandboxPool]) -> dict:
    limits = Limits(start_timeout_s=args.start_timeout)
    rss0, daemons0 = rss_bytes(os.getpid()), daemons_rss()
    pool = SandboxPool(size=n, image=args.image, limits=limits, max_starting=args.max_starting, warm=False)
    pools.append(pool)
    row: dict = {"n": n, "pool_id": pool.pool_id}
    try:
        t0 = time.perf_counter()
        try:
            row["alone"], row["cold"] = warm(pool, n, args.wave, args.alone, args.deadline)
        except (SandboxError, TimeoutError) as e:
            row["warm_error"] = f"{e} (after {time.perf_counter() - t0:.1f}s)"
            return row
        row["warm_s"] = time.perf_counter() - t0
        pool.wait_settled(args.deadline)
        ids = labelled(f"{LABEL}.pool={pool.pool_id}")
        row["idle_containers"] = len(ids)
        row["mem"] = idle_memory(ids)
        row["daemons_mib"] = (daemons_rss() - daemons0) / MiB / max(1, len(ids))
        row["client_mib"] = (rss_bytes(os.getpid()) - rss0) / MiB / max(1, len(ids))
        row["idle_cpu"] = idle_cpu(ids, args.idle_window)
        row["serial"] = serial_exec_ms(pool, args.serial)
        rounds = []
        for _ in range(args.rounds):
            rounds.append(one_round(pool, n, args.deadline))
            pool.wait_settled(args.deadline)
        row["rounds"] = rounds
        row["stats"] = dict(pool.stats)
    finally:
        t0 = time.perf_counter()
        pool.close()
        row["close_s"] = time.perf_counter() - t0
        # Interrupted mid-phase, workers may still be starting containers (each start has a
        # deadline): wait for them, so the sweep below sees every container this pool made.
        end = time.monotonic() + args.start_timeout + 15
        for t in threading.enumerate():
            if t.name.startswith(WORKER):
                t.join(max(0.0, end - time.monotonic()))
        pool.wait_settled(30)  # replacements in flight finish destroying (close stops refills)
        row["left"] = len(labelled(f"{LABEL}.pool={pool.pool_id}"))
        remove_all(f"{LABEL}.pool={pool.pool_id}")  # never leave them, but count them first
        pools.remove(pool)
    return row


def report(row: dict, args) -> None:
    n = row["n"]
    print(f"\n== N = {n} (pool {row['pool_id']})")
    if "warm_error" in row:
        print(f"  could not warm the pool to {n}: {row['warm_error']}")
        print(f"  containers left after close: {row['left']}")
        return
    alone, cold = row["alone"], row["cold"] or [float("nan")]
    print(f"  warm to {n}: {row['warm_s']:.1f} s = {n / row['warm_s']:.1f} containers/s started "
          f"({len(alone)} alone, p50 {pct(alone, 50):.0f} ms; then waves of {args.wave}, <= {args.max_starting} "
          f"starting at once, open p50 {pct(cold, 50):.0f} ms, p99 {pct(cold, 99):.0f} ms)")
    m = row["mem"]
    cg, shim = m["cgroup"], m["shim"]
    shim_med = statistics.median(shim) if shim else 0.0
    total = statistics.median(cg) + shim_med + max(0.0, row["daemons_mib"]) + max(0.0, row["client_mib"])
    print(f"  idle sandbox memory ({row['idle_containers']} idle, {m['source']}): container median "
          f"{statistics.median(cg):.2f} MiB (min {min(cg):.2f}, max {max(cg):.2f}, sum {sum(cg):.0f}); "
          f"containerd-shim PSS median {shim_med:.2f} MiB ({len(shim)} shims); dockerd+containerd "
          f"{row['daemons_mib']:+.2f} MiB and this client {row['client_mib']:+.2f} MiB per container; "
          f"total ~{total:.1f} MiB per sandbox")
    row["mem_total"] = total
    cpu = row["idle_cpu"]
    print(f"  idle CPU over {args.idle_window:g} s, all {row['idle_containers']} together, in cores: "
          + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()))
    s = row["serial"]
    print(f"  one session alone: exec p50 {pct(s, 50):.1f} ms, p99 {pct(s, 99):.1f} ms "
          f"({1000 / statistics.mean(s):.0f} exec/s)")
    acq = [x for r in row["rounds"] for x in r["acquire"]]
    exe = [x for r in row["rounds"] for x in r["exec"]]
    rel = [x for r in row["rounds"] for x in r["release"]]
    live = min(r["live"] for r in row["rounds"])
    tput = statistics.median(len(r["exec"]) / r["exec_wall"] for r in row["rounds"])
    errors = [e for r in row["rounds"] for e in r["errors"]]
    print(f"  {len(row['rounds'])} rounds of {n} at once: live sessions (min over rounds) {live}/{n}; "
          f"acquire p50 {pct(acq, 50):.2f} ms, p99 {pct(acq, 99):.2f} ms, max {max(acq):.2f} ms; "
          f"exec p50 {pct(exe, 50):.0f} ms, p99 {pct(exe, 99):.0f} ms ({tput:.0f} exec/s); "
          f"release (reset) p50 {pct(rel, 50):.0f} ms, p99 {pct(rel, 99):.0f} ms")
    print(f"  pool stats {row['stats']}; errors {len(errors)}" + (f", first: {errors[0]!r}" if errors else ""))
    print(f"  pool.close() took {row['close_s']:.1f} s; containers left after close: {row['left']}")
    row.update(acq=acq, exe=exe, live=live, tput=tput, serial_tput=1000 / statistics.mean(s))


def through_ray(sessions: int, calls: int, deadline_s: float) -> dict:
    """`sessions` sessions at once through one pool actor (`serve_pool`, the per-node service),
    `calls` execs each: per-call latency in ms and the actor's calls per second."""
    import ray

    from sandbox.actor import RemotePool, serve_pool
    from sandbox.pool import reap_orphans

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        actor = serve_pool(size=sessions, name="bench-scale-pool")
        remote = RemotePool(actor)
        remote.run(cmd=COMMAND)  # waits for the actor and its warm pool

        def episode(_):
            t0 = time.perf_counter()
            s = remote.session()
            lat = [(time.perf_counter() - t0) * 1000]  # the acquire, one actor call
            with s:
                for _ in range(calls):
                    t0 = time.perf_counter()
                    assert s.exec(COMMAND).stdout == "ok\n"
                    lat.append((time.perf_counter() - t0) * 1000)
            return lat

        t0 = time.perf_counter()
        res = run_threads(sessions, episode, deadline_s)
        wall = time.perf_counter() - t0
        ray.get(actor.close.remote())
    finally:
        ray.shutdown()  # kills the actor; if it had no time to close its pool, its containers are
        time.sleep(1.0)  # orphans (their owner pid is gone), which the reaper removes
        reap_orphans(docker_client())
    if bad := failures(res):
        raise RuntimeError(f"{len(bad)}/{sessions} sessions through the actor failed: {bad[0]!r}")
    lat = [x for r in res for x in r[1:]]
    return {"open": [r[0] for r in res], "lat": lat, "rate": len(lat) / wall}


def interrupted(*_) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--rounds", type=int, default=3, help="acquire/exec/release rounds per size")
    ap.add_argument("--alone", type=int, default=5, help="cold starts timed one at a time (the baseline)")
    ap.add_argument("--wave", type=int, default=32, help="sessions opened at once while warming")
    ap.add_argument("--max-starting", type=int, default=4, help="the pool's limit on containers starting at once")
    ap.add_argument("--start-timeout", type=float, default=30.0, help="Limits.start_timeout_s")
    ap.add_argument("--serial", type=int, default=50, help="exec calls of the one-session baseline")
    ap.add_argument("--ray-sessions", type=int, default=16, help="sessions through one Ray pool actor (0: skip)")
    ap.add_argument("--ray-calls", type=int, default=25, help="execs per session through the actor")
    ap.add_argument("--idle-window", type=float, default=5.0, help="seconds over which idle CPU is measured")
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds any one phase may take")
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    args = ap.parse_args()

    # SIGTERM (and SIGINT, even where a shell started us with it ignored) unwinds like Ctrl-C,
    # through the finally blocks that remove the containers.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    others_before = len(labelled(LABEL))
    print(f"{os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / (1 << 30):.1f} GiB; "
          f"load average {os.getloadavg()[0]:.2f}; command {COMMAND!r}; {others_before} other sandbox "
          f"container(s) on the daemon at start; limits per container: {Limits().memory_mb} MiB, "
          f"{Limits().cpus:g} CPU; image {args.image} {image_mb(args.image):.0f} MB")
    rows, pools = [], []
    try:
        for n in args.sizes:
            row = measure(n, args, pools)
            report(row, args)
            rows.append(row)
    finally:
        for pool in pools:  # only set when a size was interrupted mid-way
            pool.close()
            removed = remove_all(f"{LABEL}.pool={pool.pool_id}")
            print(f"interrupted: removed {removed} more container(s) of pool {pool.pool_id}", file=sys.stderr)
    if args.ray_sessions:
        r = through_ray(args.ray_sessions, args.ray_calls, args.deadline)
        print(f"\n== through one Ray pool actor: {args.ray_sessions} sessions at once, {args.ray_calls} execs each: "
              f"acquire p50 {pct(r['open'], 50):.1f} ms, max {max(r['open']):.1f} ms; exec p50 {pct(r['lat'], 50):.1f} ms, "
              f"p99 {pct(r['lat'], 99):.1f} ms; {r['rate']:.0f} exec calls/s")
    left_any = len(labelled(LABEL))

    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; sandbox containers on the daemon now "
          f"(anyone's): {left_any}, at start: {others_before}")
    big = rows[-1]
    n = big["n"]
    if "warm_error" in big:
        print(f"(the pool could not be warmed to {n}: see above)")
    live = big.get("live", 0)
    print(f"sessions live at once vs {SESSIONS_TARGET}: ratio {live / SESSIONS_TARGET:.2f} (target >= 1)")
    if "acq" in big:
        print(f"(baseline, same run: a cold start alone p50 {pct(big['alone'], 50):.0f} ms, the acquire "
              f"when the pool has no idle container; the warm acquire p99 at {n} is "
              f"{pct(big['alone'], 50) / pct(big['acq'], 99):.0f}x faster)")
        print(f"acquire p99 at {n} sessions vs {ACQUIRE_TARGET_MS:g} ms: "
              f"ratio {pct(big['acq'], 99) / ACQUIRE_TARGET_MS:.3f} (target <= 1)")
        print(f"exec throughput, {n} concurrent sessions vs 1 session alone: "
              f"ratio {big['tput'] / big['serial_tput']:.2f} (target >= 1)")
    print(f"containers left after close: ratio {sum(r['left'] for r in rows)} (target <= 0)")


if __name__ == "__main__":
    main()
