"""`python -m pipeline validate|run|submit FILE [KEY=VALUE ...]`: the workflow command line;
`python -m pipeline report runs/<workflow>` writes the run's report.html (`run` writes it too).

KEY=VALUE overrides a field of the file, as Hydra users type it: `stages.grpo_math.config.lr=1e-4
seed=3` (`pipeline.overrides`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.config import StageFailed, UserError, Workflow, load_workflow

log = logging.getLogger("pipeline")


def describe(wf: Workflow) -> str:
    """The stage graph, one stage a line in the order they run."""
    width = max(len(n) for n in wf.stages)
    kinds = max(len(s.kind) for s in wf.stages.values())
    lines = [f"{wf.path}: workflow {wf.name!r}, {len(wf.stages)} stages"]
    for name, st in wf.stages.items():
        needs = f"  <- {', '.join(st.needs)}" if st.needs else ""
        lines.append(f"  {name:<{width}}  {st.kind:<{kinds}}{needs}".rstrip())
    return "\n".join(lines)


def one_line(e: Exception) -> str:
    """The error as one printable line: a Ray-wrapped error gives its cause, control characters are escaped."""
    e = getattr(e, "cause", None) or e  # ray.exceptions.RayTaskError carries the actor's error as `cause`
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(e))


def quiet_ray() -> None:
    """Disconnect from Ray (stopping an embedded one) so that no forwarded worker log lands after our error line."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into one line and exit 2)."""
    n = int(text)
    if n < 1:
        raise ValueError(text)
    return n


def report_after_run(run_dir: Path) -> None:
    """Write `run_dir/report.html` after a run; a report that fails only warns: the run's result stands."""
    try:
        from pipeline.report import write_report

        print(f"report: {write_report(run_dir)}")
    except Exception as e:  # noqa: BLE001 - whatever breaks a plot must not turn a finished run into a failure
        log.warning("report not written: %s", one_line(e))


OVERRIDES_HELP = "override a field of the file: stages.NAME.config.FIELD=VALUE (VALUE is YAML), seed=3, ~KEY to unset"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="check a workflow and print its stage graph")
    v.add_argument("file", type=Path)
    v.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    for name, text in (("run", "run stages here (embedded Ray, or --address)"),
                       ("submit", "submit each stage as its own Ray job")):
        r = sub.add_parser(name, help=text)
        r.add_argument("file", type=Path)
        r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
        r.add_argument("--stage", help="only this stage (its needs must have finished)")
        r.add_argument("--runs-dir", type=Path, default=Path("runs"), help="artifact root (default: runs/)")
        r.add_argument("--force", action="store_true", help="redo stages that already finished")
        r.add_argument("--address", required=name == "submit",
                       help="Ray cluster (run: ray://host:10001 or auto; submit: http://host:8265)")
        r.add_argument("--max-parallel", type=positive, metavar="N",
                       help="at most N stages at once (default: as many as the cluster's CPUs and GPUs admit)")
    rep = sub.add_parser("report", help="write a run's report.html: curves, timings, eval table")
    rep.add_argument("dir", type=Path, help="the workflow's run directory, runs/<workflow>")
    rep.add_argument("--out", type=Path, help="where to write the page (default: DIR/report.html)")
    # Overrides may come before or after the options (`run FILE --stage x lr=1` or `run FILE lr=1 --stage x`);
    # argparse gives those after an option back as unknown arguments.
    args, extra = p.parse_known_args(argv)
    flags = [a for a in extra if a.startswith("-")]
    if flags:
        p.error(f"unrecognized arguments: {' '.join(flags)}")
    if args.cmd == "report" and extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.cmd == "report":
            from pipeline.report import write_report

            print(f"report: {write_report(args.dir, args.out)}")
            return 0
        wf = load_workflow(args.file, args.overrides)
        if args.cmd == "validate":
            print(describe(wf))
        elif args.cmd == "run":
            from pipeline.runner import run_workflow, workflow_dir

            status = run_workflow(wf, args.runs_dir, args.stage, args.force, args.address, args.max_parallel)
            print(f"{wf.name}: " + ", ".join(f"{n} {s}" for n, s in status.items()))
            report_after_run(workflow_dir(wf, args.runs_dir))
        else:
            from pipeline.submit import submit_workflow

            from pipeline.runner import workflow_dir

            submit_workflow(wf, args.address, args.runs_dir, args.stage, args.force, max_parallel=args.max_parallel)
            report_after_run(workflow_dir(wf, args.runs_dir))
    except UserError as e:
        quiet_ray()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except StageFailed as e:
        quiet_ray()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
