"""lm-eval-harness benchmarks in the eval stage: a user's own task files run offline on every named checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ARITH, TINY
from pipeline.config import UserError, load_workflow
from pipeline.context import StageContext

QUESTIONS = [(a, b) for a in range(1, 4) for b in range(2, 5)]  # 9 one-digit sums


def write_tasks(root: Path) -> Path:
    """Two tasks on one local JSONL file, as a user writes them: pick the sum (multiple choice), write it."""
    data = root / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b),
                                        "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "label": 0}) + "\n"
                            for a, b in QUESTIONS))
    tasks = root / "tasks"
    tasks.mkdir()
    common = f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\ntest_split: test\n" \
             "doc_to_text: '{{question}}'\n"
    (tasks / "sum_choice.yaml").write_text(
        "task: sum_choice\n" + common + "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list: [{metric: acc}]\n")
    (tasks / "sum_answer.yaml").write_text(
        "task: sum_answer\n" + common + "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 4, do_sample: false}\n"
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n")
    return tasks


@pytest.fixture(scope="module")
def two_models(tiny_base, tmp_path_factory) -> list[str]:
    """The tiny base and a second tiny model of other weights, with the same tokenizer."""
    from experts.models import build_tiny_model, load_tokenizer, save_checkpoint

    other = tmp_path_factory.mktemp("other") / "model"
    save_checkpoint(build_tiny_model(load_tokenizer(tiny_base), seed=1, **TINY), load_tokenizer(tiny_base), other)
    return [str(tiny_base), str(other)]


def test_lm_eval_tasks_run_on_every_model_beside_the_domain_scores(ray_session, two_models, tmp_path):
    from experts import eval as eval_stage

    tasks = write_tasks(tmp_path)
    cfg = eval_stage.Config(models=two_models, data=[ARITH], limit=2, max_new_tokens=4, batch_size=8,
                            lm_eval={"tasks": ["sum_choice", "sum_answer"], "include_path": str(tasks), "limit": 5,
                                     "num_fewshot": 0, "batch_size": 4})
    ctx = StageContext(workflow="t", name="eval", out_dir=tmp_path / "out")
    ctx.out_dir.mkdir()
    eval_stage.run(cfg, ctx)

    report = json.loads((ctx.out_dir / "eval.json").read_text())
    bench = report["lm_eval"]
    assert bench["metric"] == {"sum_choice": "acc,none", "sum_answer": "exact_match,none"}
    for task in ("sum_choice", "sum_answer"):
        assert set(bench["scores"][task]) == set(two_models), "the task ran on every model (the stage's by default)"
        assert all(0.0 <= s <= 1.0 for s in bench["scores"][task].values())
        assert bench["n"][task] == {m: 5 for m in two_models}, "limit: 5 of the 9 documents scored"
    assert set(report["scores"]["math"]) == set(two_models), "the stage's own domain scores are still there"
    logged = json.loads((ctx.out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged[f"lm_eval/sum_choice/{two_models[1]}"] == bench["scores"]["sum_choice"][two_models[1]]


def test_lm_eval_runs_only_on_the_models_it_names(ray_session, two_models, tmp_path):
    from experts import eval as eval_stage

    cfg = eval_stage.Config(models=two_models, data=[], lm_eval={
        "tasks": ["sum_choice"], "models": two_models[1:], "include_path": str(write_tasks(tmp_path)), "limit": 3})
    ctx = StageContext(workflow="t", name="eval", out_dir=tmp_path / "out")
    ctx.out_dir.mkdir()
    eval_stage.run(cfg, ctx)

    report = json.loads((ctx.out_dir / "eval.json").read_text())
    assert report["scores"] == {} and report["lm_eval"]["n"] == {"sum_choice": {two_models[1]: 3}}


def test_unknown_task_fails_validation_in_one_line_naming_it(tmp_path):
    tasks = write_tasks(tmp_path)
    wf = tmp_path / "wf.yaml"
    wf.write_text(f"""
name: t
stages:
  base: {{kind: base_model, config: {{vocab_size: 300}}}}
  ev: {{kind: eval, needs: [base], config: {{models: [base], lm_eval: {{tasks: [sum_choise], include_path: {tasks}}}}}}}
""")
    with pytest.raises(UserError) as e:
        load_workflow(wf)
    msg = str(e.value)
    assert "\n" not in msg and "stages.ev.config.lm_eval.tasks: " in msg, msg
    assert "'sum_choise' is not an lm-eval task" in msg and "did you mean 'sum_choice'" in msg, msg
