"""The run report: a real run writes report.html, a browser shows every plot, names from files stay text."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from pipeline.report import choose_panels, earlier_attempts, load_run, phase_totals, render_html, series, timers_overrun
from tests.pipeline.test_run import pipeline, tiny_workflow

# Names and shapes as the stages log them (from a quickstart run: grpo's mixed stage and opd).
GRPO_ROW = {"loss": 0.01, "reward/mean": 0.9, "reward/std": 0.3, "reward/math": 0.8, "reward/format": 1.0,
            "reward/math/failed": 0, "domain/math/reward_mean": 0.8, "domain/math/length_mean": 20.0,
            "domain/code/reward_mean": 1.0, "domain/code/length_mean": 30.0, "pass_rate/math": 0.9, "kl": 0.001,
            "entropy": 0.3, "response/length_mean": 25.0, "response/length_max": 120, "refill/generate_calls": 2,
            "time/generate": 5.0, "time/score": 1.0, "time/train": 3.0, "time/sync": 0.05}
OPD_ROW = {"round": 1, "loss": 0.5, "reverse_kl/domain/math": 0.4, "reverse_kl/domain/code": 0.6,
           "reverse_kl/teacher/grpo_math": 0.4, "tokens/domain/math": 900, "weight/domain/math": 0.5,
           "response_len/mean": 30.0, "time/generate": 2.0, "time/teacher_forward": 1.0, "time/train": 0.5}


def write_stage(run: Path, name: str, kind: str, rows: list[dict], seconds: float | None = None, t0: float = 1e9) -> Path:
    d = run / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"kind: {kind}\nneeds: []\nconfig: {{}}\n")
    lines = [json.dumps({"step": i + 1, "time": t0 + 10 * (i + 1), **r}) for i, r in enumerate(rows)]
    (d / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if seconds is not None:
        (d / "DONE.json").write_text(json.dumps({"seconds": seconds, "started": t0, "ended": t0 + seconds,
                                                 "finished": "2026-01-01T00:00:00"}))
    return d


def browser() -> str:
    """Headless Chromium's executable; missing, the test skips, except in CI (which installs it: .ci/browser.sh)."""
    exe = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
    if exe is None:
        msg = "no Chromium to render the report: bash .ci/browser.sh installs it"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def chromium(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp / 'chromium-profile'}", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


def images_loaded(exe: str, page: Path, tmp: Path) -> tuple[int, int]:
    """(images decoded with a width, images on the page), as Chromium counts them once the page has loaded.

    The report runs no script, so a copy gets one that writes the count into the DOM Chromium dumps."""
    probe = tmp / "probe.html"
    probe.write_text(page.read_text().replace("</body>", (
        "<script>addEventListener('load', () => { const im = [...document.images];"
        " document.body.dataset.images = im.filter(i => i.complete && i.naturalWidth > 0).length + '/' + im.length;"
        " });</script></body>")))
    r = chromium(exe, tmp, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    m = re.search(r'data-images="(\d+)/(\d+)"', r.stdout)
    assert m, f"Chromium dumped no image count: {r.stderr[-2000:]}"
    return int(m.group(1)), int(m.group(2))


def test_a_real_run_writes_a_report_that_a_browser_shows_whole(tmp_path):
    wf = tmp_path / "wf.yaml"
    wf.write_text(tiny_workflow("reported", sft_steps=6, save_every=3))
    runs = tmp_path / "runs"
    (runs / "reported" / "report.html").mkdir(parents=True)  # a directory where the page goes: writing it fails

    r = pipeline("run", wf, "--runs-dir", runs)
    assert r.returncode == 0, r.stderr[-3000:]  # a report that fails only warns
    assert "reported: base ran, sft ran, eval ran" in r.stdout and "report not written" in r.stderr

    (runs / "reported" / "report.html").rmdir()
    again = pipeline("run", wf, "--runs-dir", runs)
    assert again.returncode == 0 and "report: " in again.stdout
    auto = (runs / "reported" / "report.html").read_text()
    for heading in ("Evaluation", "Timeline", "Where the time went", "alt=\"sft metrics\""):
        assert heading in auto

    page = tmp_path / "page.html"
    cli = pipeline("report", runs / "reported", "--out", page)
    assert cli.returncode == 0 and f"report: {page}" in cli.stdout, cli.stderr[-2000:]
    html = page.read_text()
    assert "src=\"http" not in html and "src='http" not in html  # self-contained: nothing to fetch

    exe = browser()
    shot = tmp_path / "shot.png"
    chromium(exe, tmp_path, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri())
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 1600)
    assert len(im.getcolors(maxcolors=1 << 20) or []) > 50  # text, tables and plots, not a blank page
    loaded, total = images_loaded(exe, page, tmp_path)
    assert total == html.count("<img ") >= 4 and loaded == total


def test_grpo_and_opd_stages_get_the_curves_people_look_for():
    grpo, rest = choose_panels(series([GRPO_ROW, {**GRPO_ROW, "loss": 0.02}]))
    titles = [t for t, _ in grpo]
    assert titles[:4] == ["loss", "reward (mean, per function)", "reward per domain", "pass rate"]
    assert {"KL to the reference", "entropy", "response length", "response length per domain"} <= set(titles)
    assert set(dict(grpo)["reward per domain"]) == {"math", "code"}
    assert set(dict(grpo)["reward (mean, per function)"]) == {"mean", "math", "format"}  # not std, not failures
    assert "refill/generate_calls" in rest and not any(k.startswith("time/") for k in rest)

    opd = dict(choose_panels(series([OPD_ROW, OPD_ROW]))[0])
    assert set(opd["divergence to the teacher, per domain"]) == {"reverse_kl math", "reverse_kl code"}
    assert set(opd["divergence to each teacher"]) == {"reverse_kl grpo_math"}


def test_every_stage_appears_even_one_that_logged_nothing(tmp_path):
    run = tmp_path / "wf"
    write_stage(run, "grpo_math", "grpo", [GRPO_ROW] * 3, seconds=40)
    write_stage(run, "opd", "opd", [OPD_ROW] * 3, seconds=20, t0=1e9 + 50)
    write_stage(run, "silent", "sft", [])
    (run / "grpo_math" / "metrics.jsonl").open("a").write('{"step": 4, "loss": 0.')  # torn by a kill
    stages = load_run(run)
    assert [s.name for s in stages] == ["grpo_math", "opd", "silent"]  # in the order they started
    assert len(stages[0].rows) == 3
    html = render_html("wf", stages)
    assert "This stage logged no metrics" in html and "not finished (no DONE.json)" in html
    assert html.count("<img ") == 4  # timeline, phases, one grid per stage that logged


def test_names_from_files_stay_text(tmp_path):
    run = tmp_path / "wf"
    evil, tex = "<script>alert(1)</script>", r"cost$\nope$"  # markup for the page, bad mathtext for matplotlib
    rows = [{"loss": 1.0, f"reward/{tex}": 1, evil: 1}, {"loss": 0.5, f"reward/{tex}": 2, evil: 2}]
    write_stage(run, f"<b>{tex}", "sft", rows, seconds=3)  # a directory name: no "/"
    (run / f"<b>{tex}" / "eval.json").write_text(json.dumps({"scores": {"<i>math</i>": {evil: 0.5}}}))
    html = render_html("wf", load_run(run))  # the stage name is a tick label, the reward a legend entry
    assert "<script>" not in html and "<b>cost" not in html and "<i>math" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and f"&lt;b&gt;{tex}" in html


def test_cumulative_timers_are_called_out():
    per_step = [{"time": 100 + i, "time/train": 0.9} for i in range(10)]
    cumulative = [{"time": 100 + i, "time/train": 0.9 * (i + 1)} for i in range(10)]
    assert not timers_overrun(per_step) and timers_overrun(cumulative)


def test_a_resumed_stage_shows_its_earlier_attempt(tmp_path):
    d = write_stage(tmp_path / "wf", "grpo", "grpo", [GRPO_ROW] * 6, t0=1000)  # lines at 1010 ... 1060
    (d / "DONE.json").write_text(json.dumps({"seconds": 50, "started": 1035, "ended": 1085}))  # resumed at 1035
    (stage,) = load_run(tmp_path / "wf")
    assert earlier_attempts(stage) == (1010, 1030)
    # DONE.json times the last attempt only: "other" is what its own three steps' phases leave of its 50 s
    assert phase_totals(stage)["generate"] == 30 and abs(phase_totals(stage)["other"] - (50 - 3 * 9.05)) < 1e-9


def test_a_directory_that_is_not_a_run_is_one_line_error(tmp_path):
    r = pipeline("report", tmp_path / "nothing")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: report: ")
    empty = pipeline("report", tmp_path)
    assert empty.returncode == 2 and "holds no stage directories" in empty.stderr


def test_docstring_examples():
    import doctest

    import pipeline.report

    result = doctest.testmod(pipeline.report)
    assert result.attempted > 0 and result.failed == 0
