"""`python -m sandbox` / `sandbox`: build the image, run code, open a shell, play an episode, list or clean up.

    sandbox build-image                 # debootstrap + docker import, skipped if the tag exists
    sandbox run prog.py                 # exit status is the program's
    sandbox run -c 'print(6 * 7)'
    sandbox shell                       # one session, a command per line, state kept
    sandbox episode sandbox/tasks/fix_bug.yaml --policy scripted --out runs/fix_bug.jsonl
    sandbox ps                          # live sandbox containers
    sandbox gc [--all]                  # remove containers whose pool died (or all of them)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sandbox.container import MAX_TIMEOUT_S, Limits, SandboxError, check_timeout, docker_client
from sandbox.image import DEFAULT_IMAGE, build_image

log = logging.getLogger("sandbox")
CWD_FILE = "/tmp/.sandbox-shell-cwd"


def _pool(args, size: int = 1):
    from sandbox.pool import SandboxPool

    return SandboxPool(size=size, image=args.image, limits=Limits(timeout_s=args.timeout))


def cmd_build_image(args) -> int:
    tag = build_image(args.tag, mirror=args.mirror, force=args.force)
    print(tag)
    return 0


def cmd_run(args) -> int:
    if args.code is None and args.file is None:
        raise SandboxError("run needs FILE.py or -c CODE")
    code = args.code if args.code is not None else _read(args.file)
    with _pool(args) as pool:
        r = pool.run(code, stdin=None if sys.stdin.isatty() else sys.stdin.buffer.read())
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr if r.error is None else "")
    if r.error:
        raise SandboxError(r.error)
    if r.truncated:
        print(f"sandbox: output truncated at {pool.limits.max_output_bytes} bytes", file=sys.stderr)
    if r.oom_killed:
        print("sandbox: killed: out of memory", file=sys.stderr)
    if r.timed_out:
        print(f"sandbox: timed out after {args.timeout:g}s", file=sys.stderr)
        return 124  # what timeout(1) returns
    return r.exit_code


def cmd_shell(args) -> int:
    interactive = sys.stdin.isatty()
    with _pool(args) as pool, pool.session(trajectory=args.trajectory) as s:
        if interactive:
            print(f"sandbox shell ({args.image}, no network, /work is scratch). Ctrl-D or 'exit' to leave.")
        status = 0
        while True:
            try:
                line = input("sandbox$ " if interactive else "")
            except EOFError:
                break
            if line.strip() in ("exit", "logout"):
                break
            if not line.strip():
                continue
            # Each line is a fresh bash; carry the working directory over like a real shell would.
            r = s.exec(f"trap 'pwd > {CWD_FILE}' EXIT; cd \"$(cat {CWD_FILE} 2>/dev/null || echo /work)\"\n{line}")
            sys.stdout.write(r.stdout)
            sys.stderr.write(r.stderr)
            sys.stdout.flush()
            if r.error:
                raise SandboxError(r.error)
            if r.timed_out:
                print(f"sandbox: timed out after {args.timeout:g}s", file=sys.stderr)
            status = r.exit_code
    return status


def cmd_episode(args) -> int:
    from sandbox.episode import load_task, make_policy, run_episode

    task = load_task(args.task)
    policy = make_policy(args.policy, task)
    out = Path(args.out) if args.out else Path("runs") / f"episode-{task.name}.jsonl"
    with _pool(args) as pool:
        ep = run_episode(task, policy, pool, transcript=out, trajectory=args.trajectory)
    for m in ep["messages"][2:]:
        head = m["content"].strip().splitlines()[0] if m["content"].strip() else ""
        print(f"{m['role']:>9}: {head[:100]}")
    print(f"task {task.name}: {ep['turns']} turn(s), reward {ep['reward']:.1f}; transcript {out}")
    return 0


def cmd_ps(args) -> int:
    from sandbox.pool import list_sandboxes

    rows = list_sandboxes(docker_client())
    print(f"{'NAME':<26} {'STATUS':<10} {'POOL':<14} {'OWNER PID':<10} ORPHAN")
    for r in rows:
        print(f"{r['name']:<26} {r['status']:<10} {r['pool']:<14} {r['owner_pid']:<10} {'yes' if r['orphan'] else 'no'}")
    return 0


def cmd_gc(args) -> int:
    from sandbox.pool import reap_orphans

    removed = reap_orphans(docker_client(), everything=args.all)
    print(f"removed {len(removed)} sandbox container(s)" + (": " + " ".join(removed) if removed else ""))
    return 0


def cmd_stop_services(args) -> int:
    import ray

    from sandbox.service import stop_services

    ray.init(address=args.address or None, log_to_driver=False)
    print(f"stopped {stop_services()} sandbox service(s)")
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise SandboxError(f"{path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise SandboxError(f"{path}: cannot read it as a Python file ({type(e).__name__})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sandbox", description="Run code in warm, locked-down Docker sandboxes.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the pool does")
    sub = p.add_subparsers(dest="command", required=True)

    def pooled(sp):
        sp.add_argument("--image", default=DEFAULT_IMAGE, help=f"local image with python3 (default {DEFAULT_IMAGE})")
        # Parsed in main, so a bad value is one line naming it (argparse would add its usage block).
        sp.add_argument("--timeout", default="10", help=f"wall-clock seconds per command, in (0, {MAX_TIMEOUT_S:g}] (default 10)")

    b = sub.add_parser("build-image", help="build the default image offline (debootstrap + docker import)")
    b.add_argument("--tag", default=DEFAULT_IMAGE)
    b.add_argument("--mirror", default=None, help="Debian mirror (default: the one apt uses here)")
    b.add_argument("--force", action="store_true", help="rebuild even if the tag exists")
    b.set_defaults(fn=cmd_build_image)

    r = sub.add_parser("run", help="run a Python file or -c CODE in a sandbox")
    r.add_argument("file", nargs="?", help="a Python file")
    r.add_argument("-c", dest="code", help="Python code to run")
    pooled(r)
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("shell", help="interactive session, one bash command per line; files and the working directory persist")
    s.add_argument("--trajectory", help="append every call to this JSONL log")
    pooled(s)
    s.set_defaults(fn=cmd_shell)

    e = sub.add_parser("episode", help="play one agent episode from a task YAML")
    e.add_argument("task", help="task YAML (see sandbox/tasks/)")
    e.add_argument("--policy", default="scripted", help="'scripted' or a local Hugging Face checkpoint dir")
    e.add_argument("--out", help="transcript JSONL (default runs/episode-NAME.jsonl)")
    e.add_argument("--trajectory", help="session trajectory log; rerun with the same file to resume")
    pooled(e)
    e.set_defaults(fn=cmd_episode)

    sub.add_parser("ps", help="list live sandbox containers").set_defaults(fn=cmd_ps)
    g = sub.add_parser("gc", help="remove sandbox containers whose pool died")
    g.add_argument("--all", action="store_true", help="remove every sandbox container, live pools' too")
    g.set_defaults(fn=cmd_gc)
    st = sub.add_parser("stop-services", help="stop every node's sandbox service of the Ray cluster (pipeline submit's last job)")
    st.add_argument("--address", default=None, help="Ray cluster (default: $RAY_ADDRESS, as inside a Ray job)")
    st.set_defaults(fn=cmd_stop_services)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if getattr(args, "timeout", None) is not None:
        try:
            args.timeout = check_timeout(args.timeout, "--timeout")
        except ValueError as e:
            print(f"sandbox: error: {e}", file=sys.stderr)
            return 2  # a usage error, as argparse's own
    from sandbox.episode import TaskError

    try:
        return args.fn(args)
    except (SandboxError, TaskError) as e:
        print(f"sandbox: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
