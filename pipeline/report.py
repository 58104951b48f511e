"""`python -m pipeline report runs/<workflow>`: one self-contained report.html to look at after a run.

It shows the eval table and a bar chart per domain, a timeline of which stage ran when, where each
stage's time went (its `time/*` phases), and per stage the curves people look at first: loss,
reward (overall, per reward function, per domain), KL, entropy, response length, OPD's divergence
per domain and per teacher. Everything comes from what the stages left on disk (metrics.jsonl,
config.yaml, DONE.json, eval/eval.json); a metric that is not there is simply left out. The plots
are PNGs (matplotlib's Agg backend) embedded as data URIs, so the one file can be mailed or
attached to an issue; the page runs no script.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config import UserError
from pipeline.context import atomic_write_text

log = logging.getLogger(__name__)

# (panel title, pattern of the metric names it plots). A series' legend label is the pattern's groups
# joined by a space, or the whole name where it has none. Order is the order a reader scans in:
# the objective first, then what explains it.
PANELS: list[tuple[str, str]] = [
    ("loss", r"^loss$"),
    ("reward (mean, per function)", r"^reward/(?!std$)([^/]+)$"),
    ("reward per domain", r"^domain/(.+)/reward_mean$"),
    ("pass rate", r"^pass_rate/(.+)$"),
    ("divergence to the teacher, per domain", r"^(reverse_kl|forward_kl|jsd)/domain/(.+)$"),
    ("divergence to each teacher", r"^(reverse_kl|forward_kl|jsd)/teacher/(.+)$"),
    ("KL to the reference", r"^kl$"),
    ("entropy", r"^entropy$"),
    ("response length", r"^response/(length_mean|length_max)$|^response_len/(mean)$"),
    ("response length per domain", r"^domain/(.+)/length_mean$"),
    ("loss weight per domain", r"^weight/domain/(.+)$"),
    ("trained tokens per domain", r"^tokens/domain/(.+)$"),
    ("pairwise accuracy", r"^(train|eval)/pairwise_accuracy$"),
    ("reward margin", r"^train/margin$"),
    ("truncated responses", r"^response/truncated_frac$"),
    ("clip fraction", r"^clip_frac$"),
    ("grad norm", r"^grad_norm$"),
    ("learning rate", r"^lr$"),
    ("rollout vs learner log-prob gap", r"^logp_gap/(.+)$|^sync/(probe_logp_gap)$"),
    ("groups", r"^groups/(.+)$"),
    ("agent turns", r"^agent/turns_mean$"),
]
TIME = re.compile(r"^time/(.+)$")
HIDDEN = {"step", "time"}  # the step is the x axis; the wall-clock stamp is not a curve
NCOLS = 4
SMOOTH_ABOVE = 60  # more points than this: the raw curve goes faint under a moving average


@dataclass
class Stage:
    """What one stage directory holds, as read from disk."""

    name: str
    kind: str = "?"
    rows: list[dict] = field(default_factory=list)
    done: dict | None = None
    eval: dict | None = None
    config: dict = field(default_factory=dict)  # the `config:` block of its config.yaml


# ---- reading ------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl; a torn or foreign line is skipped (a killed stage may leave one)."""
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif line.strip():
            log.warning("%s:%d: not a JSON object, left out of the report", path, n)
    return rows


def read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def load_run(run_dir: Path) -> list[Stage]:
    """Every stage directory under `run_dir` (one holding metrics.jsonl, DONE.json or config.yaml),
    in the order the stages started; unfinished ones last."""
    stages = []
    for d in sorted(p for p in Path(run_dir).iterdir() if p.is_dir()):
        files = {n: d / n for n in ("metrics.jsonl", "DONE.json", "config.yaml", "eval.json")}
        if not any(files[n].is_file() for n in ("metrics.jsonl", "DONE.json", "config.yaml")):
            continue
        try:
            record = yaml.safe_load(files["config.yaml"].read_text())
        except (OSError, yaml.YAMLError):
            record = None
        record = record if isinstance(record, dict) else {}
        config = record.get("config") if isinstance(record.get("config"), dict) else {}
        rows = read_jsonl(files["metrics.jsonl"]) if files["metrics.jsonl"].is_file() else []
        stages.append(Stage(d.name, str(record.get("kind", "?")), rows, read_json(files["DONE.json"]),
                            read_json(files["eval.json"]), config))
    return sorted(stages, key=lambda s: (started(s) is None, started(s) or 0.0, s.name))


def number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def started(s: Stage) -> float | None:
    return number((s.done or {}).get("started"))


def series(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Each numeric metric as (steps, values), in the order first logged; a row without a step uses its index."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(rows):
        step = number(row.get("step"))
        step = float(i) if step is None else step
        for k, v in row.items():
            if k not in HIDDEN and (x := number(v)) is not None:
                out.setdefault(str(k), ([], []))
                out[k][0].append(step)
                out[k][1].append(x)
    return out


def choose_panels(data: dict[str, tuple[list, list]]) -> tuple[list[tuple[str, dict]], list[str]]:
    """The panels a stage's metrics fill, as (title, {label: (steps, values)}), and the names left unplotted.

    A metric needs two points to be a curve; `time/*` is plotted by `time_panel`, not here."""
    panels, used = [], set()
    for title, pattern in PANELS:
        lines = {}
        for k, xy in data.items():
            m = re.match(pattern, k)
            if m and k not in used and len(xy[0]) >= 2:
                lines[" ".join(g for g in m.groups() if g) or k] = xy
                used.add(k)
        if lines:
            panels.append((title, lines))
    rest = [k for k in data if k not in used and not TIME.match(k)]
    return panels, rest


# ---- figures (each takes data, returns a matplotlib Figure; no pyplot state) -----------------------

def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def moving_average(ys: list[float], window: int) -> list[float]:
    out, acc, vals = [], 0.0, []
    for y in ys:
        vals.append(y)
        acc += y
        if len(vals) > window:
            acc -= vals.pop(0)
        out.append(acc / len(vals))
    return out


def draw_lines(ax, lines: dict[str, tuple[list, list]]) -> None:
    for i, (label, (xs, ys)) in enumerate(lines.items()):
        color = f"C{i % 10}"
        if len(xs) > SMOOTH_ABOVE and all(math.isfinite(y) for y in ys):
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, moving_average(ys, max(len(ys) // 30, 2)), color=color, linewidth=1.5, label=label)
        else:
            ax.plot(xs, ys, color=color, linewidth=1.5, marker="." if len(xs) <= 30 else None, label=label)
    if len(lines) > 1:
        ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)


def time_panel(data: dict[str, tuple[list, list]]) -> dict[str, tuple[list, list]]:
    """The `time/*` metrics as {phase: (steps, seconds)} on one shared axis of steps (0 where a step lacks a phase)."""
    phases = {TIME.match(k).group(1): dict(zip(*xy)) for k, xy in data.items() if TIME.match(k)}
    steps = sorted({s for per in phases.values() for s in per})
    return {p: (steps, [per.get(s, 0.0) for s in steps]) for p, per in phases.items()}


def stage_figure(panels: list[tuple[str, dict]], times: dict[str, tuple[list, list]]):
    """One stage's curves as a grid of small panels (plus a stacked time-per-step panel), or None when there are none."""
    n = len(panels) + bool(times)
    if n == 0:
        return None
    rows = -(-n // NCOLS)
    fig = new_figure(12.8, 2.4 * rows)
    axes = fig.subplots(rows, NCOLS, squeeze=False).ravel()
    for ax, (title, lines) in zip(axes, panels):
        draw_lines(ax, lines)
        ax.set_title(title, fontsize=9)
    if times:
        ax = axes[len(panels)]
        steps = next(iter(times.values()))[0]
        ax.stackplot(steps, *[ys for _, ys in times.values()], labels=list(times), alpha=0.8)
        ax.set_title("seconds per step, by phase", fontsize=9)
        ax.legend(fontsize=7, frameon=False, loc="upper right")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_axis_off()
    for ax in axes[:n]:
        ax.set_xlabel("step", fontsize=7)
    return fig


def earlier_attempts(s: Stage) -> tuple[float, float] | None:
    """(first, last) metric time stamps logged before the stage's last start: the attempts a resume continued."""
    start = started(s)
    stamps = [t for r in s.rows if (t := number(r.get("time"))) is not None and start is not None and t < start]
    return (min(stamps), max(stamps)) if stamps else None


def timeline_figure(spans: list[tuple[str, str, float, float, tuple[float, float] | None]]):
    """Which stage ran when: a bar per (stage, kind, start, end, earlier) over seconds since the first start;
    `earlier` (first and last metric line of attempts before the last, or None) is drawn faint."""
    t0 = min([s for _, _, s, _, _ in spans] + [e[0] for *_, e in spans if e])
    kinds = list(dict.fromkeys(k for _, k, _, _, _ in spans))
    fig = new_figure(12.8, 0.9 + 0.28 * len(spans))
    ax = fig.subplots()
    seen = set()
    for i, (name, kind, s, e, earlier) in enumerate(spans):
        color = f"C{kinds.index(kind) % 10}"
        ax.barh(i, e - s, left=s - t0, color=color, height=0.7, label=None if kind in seen else kind)  # one entry a kind
        seen.add(kind)
        ax.text(e - t0, i, f" {e - s:.0f}s", va="center", fontsize=7)
        if earlier:
            ax.barh(i, max(earlier[1] - earlier[0], 1.0), left=earlier[0] - t0, color=color, alpha=0.3, height=0.7,
                    hatch="//")
    handles, labels = ax.get_legend_handles_labels()
    if any(e for *_, e in spans):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="0.85", hatch="//", label="an attempt before a resume (its metric lines)"))
        labels.append(handles[-1].get_label())
    ax.set_yticks(range(len(spans)), [n for n, *_ in spans], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first stage started", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(handles, labels, fontsize=7, frameon=False, loc="outside upper center", ncols=len(handles))
    ax.margins(x=0.08)
    return fig


def phases_figure(totals: dict[str, dict[str, float]]):
    """Where each stage's wall time went: one stacked bar per stage of its summed `time/*` phases
    (plus "other": DONE.json's seconds not inside a timed phase, i.e. setup, loading, saving)."""
    names = list(totals)
    phases = sorted(dict.fromkeys(p for per in totals.values() for p in per), key=lambda p: p == "other")  # "other" last
    fig = new_figure(12.8, 0.9 + 0.28 * len(names))
    ax = fig.subplots()
    left = [0.0] * len(names)
    for j, p in enumerate(phases):
        widths = [totals[n].get(p, 0.0) for n in names]
        ax.barh(range(len(names)), widths, left=left, label=p, height=0.7,
                color="0.8" if p == "other" else f"C{j % 10}")
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=7, frameon=False, loc="outside upper center", ncols=len(phases))
    return fig


def eval_figure(scores: dict[str, dict[str, float]]):
    """One bar chart per eval domain: each model's score."""
    domains = [d for d, row in scores.items() if row]
    cols = min(len(domains), NCOLS)
    rows = -(-len(domains) // cols)
    fig = new_figure(12.8, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, d in zip(axes, domains):
        models = list(scores[d])
        vals = [number(scores[d][m]) or 0.0 for m in models]
        bars = ax.bar(range(len(models)), vals, color=[f"C{i % 10}" for i in range(len(models))])
        ax.bar_label(bars, [f"{v:.2f}" for v in vals], fontsize=7)
        ax.set_xticks(range(len(models)), models, rotation=40, ha="right", fontsize=7)
        ax.set_title(d, fontsize=9)
        ax.set_ylim(0, max([1.0, *vals]) * 1.12)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(domains):]:
        ax.set_axis_off()
    return fig


def phase_seconds(row: dict) -> dict[str, float]:
    return {k.removeprefix("time/"): x for k, v in row.items() if TIME.match(str(k)) and (x := number(v)) is not None}


def phase_totals(s: Stage) -> dict[str, float]:
    """A stage's summed `time/*` phases, plus "other": the seconds of its last attempt (DONE.json) that no
    timed phase of that attempt covers (set-up, loading, saving). Empty when it timed nothing."""
    totals: dict[str, float] = {}
    for row in s.rows:
        for p, x in phase_seconds(row).items():
            totals[p] = totals.get(p, 0.0) + x
    start, seconds = started(s), number((s.done or {}).get("seconds"))
    if totals and start is not None and seconds is not None:
        # a resumed stage logged its earlier attempts too; DONE.json times only the last
        last = sum(sum(phase_seconds(r).values()) for r in s.rows if (number(r.get("time")) or 0.0) >= start)
        if seconds > last:
            totals["other"] = seconds - last
    return totals


def timers_overrun(rows: list[dict]) -> bool:
    """Whether the `time/*` phases add up to more than the time the log spans (plus its first step):
    impossible for per-step timers of phases that run one after another, so a sign of cumulative ones."""
    stamps = [t for r in rows if (t := number(r.get("time"))) is not None]
    timed = sum(sum(phase_seconds(r).values()) for r in rows)
    if len(stamps) < 2 or not timed:
        return False
    first = sum(phase_seconds(rows[0]).values())
    return timed > 1.05 * (max(stamps) - min(stamps) + first) + 1.0


def png_uri(fig) -> str:
    """The figure as a `data:image/png;base64,...` URI, so the page needs no other file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---- html ---------------------------------------------------------------------------------------

def esc(x) -> str:
    return html.escape(str(x), quote=True)


def img(fig, alt: str) -> str:
    return f'<img src="{png_uri(fig)}" alt="{esc(alt)}">'


def eval_table(ev: dict, order: list | None = None) -> str:
    """eval.json's scores as a table (a row per model, in `order` where it names them, a column per domain,
    the best of each column bold), and its `relative` block (a score as a share of a reference's) as a second one."""
    scores = {str(d): row for d, row in (ev.get("scores") or {}).items() if isinstance(row, dict)}
    metric = ev.get("metric") if isinstance(ev.get("metric"), dict) else {}
    scored = list(dict.fromkeys(m for row in scores.values() for m in row))
    models = [m for m in dict.fromkeys(map(str, order or [])) if m in scored] + [m for m in scored if m not in (order or [])]
    head = "".join(f"<th>{esc(d)}" + (f"<br><small>{esc(metric[d])}</small>" if metric.get(d, d) != d else "") + "</th>"
                   for d in scores)
    best = {d: max((v for v in map(number, row.values()) if v is not None), default=None) for d, row in scores.items()}
    body = []
    for m in models:
        cells = []
        for d in scores:
            v = number(scores[d].get(m))
            text = "" if v is None else f"{v:.3f}"
            cells.append(f"<td><b>{text}</b></td>" if v is not None and v == best[d] else f"<td>{text}</td>")
        body.append(f"<tr><th>{esc(m)}</th>{''.join(cells)}</tr>")
    out = f"<table><tr><th>model</th>{head}</tr>{''.join(body)}</table>"
    rel = ev.get("relative") if isinstance(ev.get("relative"), dict) else {}
    rows = [f"<tr><th>{esc(m)}</th><td>{esc(d)}</td><td>{esc(r.get('reference'))}</td>"
            f"<td>{number(r.get('score')) or 0:.3f} / {number(r.get('reference_score')) or 0:.3f}</td>"
            f"<td>{share_text(number(r.get('share')))}</td></tr>"
            for m, per in rel.items() if isinstance(per, dict) for d, r in per.items() if isinstance(r, dict)]
    if rows:
        out += ("<p>Relative scores: a model's score as a share of a reference model's on the same domain.</p>"
                "<table><tr><th>model</th><th>domain</th><th>reference</th><th>score / reference</th>"
                f"<th>share</th></tr>{''.join(rows)}</table>")
    return out


def share_text(share: float | None) -> str:
    """A relative score as shown: none where the reference scores 0 (no share of nothing means anything).

    >>> share_text(1.1875), share_text(None)
    ('1.188', 'none (reference 0)')
    """
    return "none (reference 0)" if share is None else f"{share:.3f}"


def values_table(row: dict) -> str:
    """A one-row stage's metrics as name/value pairs."""
    cells = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in row.items() if k not in HIDDEN)
    return f"<table>{cells}</table>"


def stage_section(s: Stage) -> str:
    """One stage's heading, status line and curves (or a line saying it logged nothing)."""
    status = (f"finished in {number(s.done.get('seconds')) or 0:.1f} s at {esc(s.done.get('finished', '?'))}"
              if s.done else "not finished (no DONE.json)")
    parts = [f'<h3 id="stage-{esc(s.name)}">{esc(s.name)} <small>{esc(s.kind)}</small></h3>',
             f"<p>{status}; {len(s.rows)} metric lines.</p>"]
    data = series(s.rows)
    panels, rest = choose_panels(data)
    fig = stage_figure(panels, time_panel(data) if len(s.rows) >= 2 else {})
    if not s.rows:
        parts.append("<p><i>This stage logged no metrics.</i></p>")
    elif fig is not None:
        parts.append(img(fig, f"{s.name} metrics"))
        if rest:
            parts.append(f"<p class=rest>Also logged, not plotted: {esc(', '.join(rest))}</p>")
    elif s.eval is not None:
        parts.append('<p>Its scores are in <a href="#eval">Evaluation</a>.</p>')
    else:
        parts.append(values_table(s.rows[-1]))
    return "\n".join(parts)


CSS = """body{font-family:system-ui,sans-serif;max-width:1300px;margin:1.5em auto;padding:0 1em;color:#222}
img{max-width:100%;display:block}h2{border-bottom:1px solid #ccc;margin-top:1.6em}h3 small{color:#777;font-weight:normal}
table{border-collapse:collapse;margin:.5em 0;font-size:14px}td,th{border:1px solid #ddd;padding:3px 9px;text-align:right}
th{background:#f6f6f6}.rest{color:#777;font-size:12px}nav a{margin-right:.8em}.warn{color:#a40}"""


def render_html(title: str, stages: list[Stage]) -> str:
    """The whole report page for a run's stages (as `load_run` gives them)."""
    import matplotlib

    matplotlib.use("Agg")  # no display, and no pyplot: figures are built from matplotlib.figure.Figure
    with matplotlib.rc_context({"text.parse_math": False}):  # a "$" in a name from a file stays a "$"
        return _render(title, stages)


def _render(title: str, stages: list[Stage]) -> str:
    done = [s for s in stages if s.done and started(s) is not None and number(s.done.get("ended")) is not None]
    wall = (max(number(s.done["ended"]) for s in done) - min(started(s) for s in done)) if done else None
    out = [f"<!doctype html><html><head><meta charset=utf-8><title>{esc(title)} report</title>",
           f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>",
           f"<p>{len(stages)} stages, {len(done)} finished"
           + (f", {wall / 60:.1f} min from the first start to the last end" if wall is not None else "")
           + f". Report written {esc(time.strftime('%Y-%m-%d %H:%M'))}.</p>",
           "<nav>" + " ".join(f'<a href="#stage-{esc(s.name)}">{esc(s.name)}</a>' for s in stages) + "</nav>"]
    evals = [s for s in stages if s.eval and isinstance(s.eval.get("scores"), dict)]
    for s in evals:
        out.append(f'<h2 id="eval">Evaluation <small>({esc(s.name)})</small></h2>')
        models = s.config.get("models")
        out.append(eval_table(s.eval, models if isinstance(models, list) else None))
        if any(isinstance(r, dict) and r for r in s.eval["scores"].values()):
            out.append(img(eval_figure({d: r for d, r in s.eval["scores"].items() if isinstance(r, dict)}),
                           "eval scores per domain"))
    if done:
        out.append("<h2>Timeline</h2>")
        out.append(img(timeline_figure([(s.name, s.kind, started(s), number(s.done["ended"]), earlier_attempts(s))
                                        for s in done]),
                       "stage timeline"))
    over = [s.name for s in stages if timers_overrun(s.rows)]  # would only stretch the axis: left out, named
    totals = {s.name: t for s in stages if s.name not in over and (t := phase_totals(s))}
    if totals or over:
        out.append("<h2>Where the time went</h2>")
    if totals:
        out.append(img(phases_figure(totals), "time per phase and stage"))
    if over:
        out.append(f"<p class=warn>Left out: {esc(', '.join(over))}, whose timed phases add up to more time than "
                   "passed between its metric lines; its time/* metrics look cumulative rather than per step.</p>")
    out.append("<h2>Stages</h2>")
    out.extend(stage_section(s) for s in stages)
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of the workflow run in `run_dir` (default `run_dir/report.html`); returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"report: {run_dir} is not a directory (give runs/<workflow>)")
    stages = load_run(run_dir)
    if not stages:
        raise UserError(f"report: {run_dir} holds no stage directories (metrics.jsonl, DONE.json or config.yaml)")
    out = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(out, render_html(run_dir.resolve().name, stages))
    return out
