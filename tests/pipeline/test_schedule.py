"""The stage scheduler's admission: needs first, then what the cluster holds, then --max-parallel."""

from __future__ import annotations

import pytest

from pipeline.config import StageFailed, UserError, load_workflow
from pipeline.schedule import run_graph


class Recorder:
    """A launcher that ends stages in the order started, recording who ran beside whom."""

    def __init__(self, fail: str | None = None):
        self.running: list[str] = []
        self.started: list[str] = []
        self.beside: dict[str, set[str]] = {}
        self.fail = fail

    def start(self, name):
        for other in self.running:
            self.beside.setdefault(name, set()).add(other)
            self.beside.setdefault(other, set()).add(name)
        self.running.append(name)
        self.started.append(name)

    def wait_one(self):
        name = self.running.pop(0)
        return name, (StageFailed(f"stage {name!r} broke") if name == self.fail else None)


@pytest.fixture
def graph(tmp_path):
    """base -> a, b, c (independent) -> eval (needs a, b, c)."""
    data = "{domain: math, source: reasoning_gym, task: basic_arithmetic, size: 40, heldout: 4}"
    sft = "{kind: sft, needs: [base], config: {model: base, data: %s, steps: 2}}" % data
    (tmp_path / "wf.yaml").write_text(f"""
name: g
stages:
  base: {{kind: base_model, config: {{tokenizer_data: [{data}], vocab_size: 300}}}}
  a: {sft}
  b: {sft}
  c: {sft}
  eval: {{kind: eval, needs: [a, b, c], config: {{models: [a, b, c], data: [{data}]}}}}
""")
    return load_workflow(tmp_path / "wf.yaml")


def one_cpu_each(name):
    return {"CPU": 1.0}


def test_stages_start_side_by_side_as_far_as_the_cluster_admits(graph):
    rec = Recorder()
    ended = run_graph(graph, list(graph.stages), set(), rec, one_cpu_each, {"CPU": 2.0})
    assert ended == ["base", "a", "b", "c", "eval"]
    # two CPUs: a beside b; c starts when a ends, beside b; base and eval (which need the others) alone
    assert rec.beside == {"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}


def test_max_parallel_and_a_stage_bigger_than_the_cluster(graph):
    rec = Recorder()
    run_graph(graph, list(graph.stages), set(), rec, one_cpu_each, {"CPU": 8.0}, max_parallel=1)
    assert rec.beside == {}  # one at a time
    rec = Recorder()
    ended = run_graph(graph, list(graph.stages), set(), rec, lambda n: {"CPU": 4.0}, {"CPU": 2.0})
    assert ended == ["base", "a", "b", "c", "eval"] and rec.beside == {}  # too big: each runs alone, none skipped


def test_after_a_failure_nothing_new_starts_and_the_first_error_is_raised(graph):
    rec = Recorder(fail="a")
    with pytest.raises(StageFailed, match="'a' broke"):
        run_graph(graph, list(graph.stages), set(), rec, one_cpu_each, {"CPU": 2.0})
    assert rec.started == ["base", "a", "b"]  # b was running beside a and finished; c and eval never started


def test_finished_stages_count_as_done(graph):
    rec = Recorder()
    ended = run_graph(graph, ["eval"], {"base", "a", "b", "c"}, rec, one_cpu_each, {"CPU": 1.0})
    assert ended == ["eval"]
    with pytest.raises(UserError, match="never ran"):
        run_graph(graph, ["eval"], {"base"}, Recorder(), one_cpu_each, {"CPU": 1.0})
