"""Hostile or careless input (issue 11) is one line and exit 2, and nothing outside the run's directory moves.

Names cannot leave runs/, numbers are finite and bounded, YAML cannot bomb or hide a duplicate key,
a diverged loss fails its stage, and two runs of one workflow never write at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import MAX_YAML_BYTES, UserError, load_workflow
from pipeline.context import atomic_dir
from pipeline.runner import LOCK_FILE, stage_dirs, workflow_lock
from tests.conftest import ARITH, TINY

REPO = Path(__file__).resolve().parents[2]

DATA = json.dumps({**ARITH, "size": 60, "heldout": 4})
OK_STAGE = "{kind: base_model, config: {vocab_size: 300}}"


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The CLI's error: exit 2, exactly one line on stderr, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def error_of(tmp_path: Path, text: str) -> str:
    f = tmp_path / "wf.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        load_workflow(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(f)), msg
    return msg


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its content, to show that nothing there changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- 1. names cannot escape the runs directory

BAD_NAMES = ["../victim", "/abs/path", "", ".", "..", ".hidden", "a/b", "a\\b", "x" * 65, "-rf", "a\x00b", "a\nb"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_workflow_name_is_refused_at_validate(tmp_path, name):
    msg = error_of(tmp_path, f"name: {json.dumps(name)}\nstages: {{base: {OK_STAGE}}}\n")
    assert "name: Value error, workflow name" in msg and "letters, digits" in msg


@pytest.mark.parametrize("name", BAD_NAMES + ["x" * 300], ids=repr)
def test_bad_stage_name_is_refused_at_validate(tmp_path, name):
    msg = error_of(tmp_path, f"name: t\nstages: {{{json.dumps(name)}: {OK_STAGE}}}\n")
    assert "stages: stage name" in msg and "letters, digits" in msg
    assert len(msg) < 300  # a long name is shortened, not echoed whole


def test_forced_stage_named_dotdot_deletes_nothing(tmp_path):
    """The reported attack: `--force` on a stage named '..' removed the whole runs directory."""
    runs = tmp_path / "runs"
    victim = runs / "other_workflow" / "sft" / "DONE.json"
    victim.parent.mkdir(parents=True)
    victim.write_text("{}")
    outside = tmp_path / "sentinel.txt"
    outside.write_text("keep me")
    before = tree(tmp_path)
    for wf_name, stage in (("t", ".."), ("..", "base"), ("../other_workflow", "sft"), (str(tmp_path), "base")):
        f = tmp_path / "wf.yaml"
        f.write_text(f"name: {json.dumps(wf_name)}\nstages: {{{json.dumps(stage)}: {OK_STAGE}}}\n")
        msg = one_line_error(cli("run", f, "--runs-dir", runs, "--force"))
        assert "name" in msg and "letters, digits" in msg
        f.unlink()
    assert tree(tmp_path) == before


def test_stage_dir_that_resolves_outside_is_never_written_or_removed(tmp_path):
    """Defence in depth: a stage directory symlinked elsewhere is refused before --force removes it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    runs = tmp_path / "runs"
    (runs / "t").mkdir(parents=True)
    (runs / "t" / "base").symlink_to(elsewhere)
    f = tmp_path / "wf.yaml"
    f.write_text(f"name: t\nstages: {{base: {OK_STAGE}}}\n")
    with pytest.raises(UserError, match="outside"):
        stage_dirs(load_workflow(f), runs)
    msg = one_line_error(cli("run", f, "--runs-dir", runs, "--force"))
    assert "resolves to" in msg and "refusing" in msg
    assert (elsewhere / "precious.txt").read_text() == "keep me"


def test_atomic_dir_refuses_a_path_that_is_not_one_plain_entry(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "keep.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    for path in (tmp_path / "a" / "..", tmp_path / "link"):
        with pytest.raises(ValueError, match="not a plain entry"):
            with atomic_dir(path):
                pass
    assert (tmp_path / "keep.txt").exists() and (tmp_path / "a").is_dir()


# ---- 2. numbers are finite and bounded

SFT = "name: t\nstages:\n  base: {kind: base_model, config: {vocab_size: 300}}\n  sft: {kind: sft, needs: [base], config: {model: base, %s}}\n"
GRPO = "name: t\nstages:\n  base: {kind: base_model, config: {vocab_size: 300}}\n  g: {kind: grpo, needs: [base], config: {model: base, %s}}\n"


@pytest.mark.parametrize("text, expected", [
    (SFT % "lr: 1e400", "stages.sft.config.lr: Input should be a finite number, got '1e400'"),
    (SFT % "lr: .inf", "stages.sft.config.lr: Input should be a finite number"),
    (SFT % "lr: .nan", "stages.sft.config.lr: Input should be a finite number"),
    (SFT % "lr: 5.0", "stages.sft.config.lr: Input should be less than or equal to 1"),
    (SFT % "max_grad_norm: .inf", "stages.sft.config.max_grad_norm: Input should be a finite number"),
    (SFT % "batch_size: 1000000000000", "stages.sft.config.batch_size: Input should be less than or equal to 65536"),
    (SFT % "steps: 1000000000", "stages.sft.config.steps: Input should be less than or equal to 1000000"),
    (SFT % "max_len: 1000000000", "stages.sft.config.max_len: Input should be less than or equal to 1048576"),
    (SFT % "batch_size: 65536, max_len: 4096", "batch_size x max_len = 268435456 tokens per micro-batch; at most 1048576"),
    (SFT % "data: {task_args: {x: .inf}}", "stages.sft.config.data.0: Value error, task_args.x: expected a finite number"),
    (GRPO % "rewards: {weights: {math: .inf}}", "stages.g.config: Value error, rewards.weights.math: expected a finite number"),
    (GRPO % "rollout: {max_new_tokens: 1000000000}", "rollout.max_new_tokens is 1000000000; at most 1048576"),
    (GRPO % "prompts_per_step: 60000, rollout: {group_size: 64}", "prompts_per_step x rollout.group_size is 3840000"),
    (GRPO % "rollout: {temperature: .nan}", "stages.g.config.rollout.temperature: Input should be a finite number"),
    ("name: t\nstages: {b: {kind: base_model, config: {vocab_size: 1000000000}}}\n", "vocab_size: Input should be less than or equal to 1048576"),
    ("name: t\nstages: {b: {kind: base_model, config: {model: {hidden_size: 60000}, vocab_size: 1000000}}}\n", "parameters; at most"),
    ("name: t\nstages: {b: {kind: base_model, config: {model: {hidden_size: 130}}}}\n", "must be a multiple of num_attention_heads"),
    ("name: t\nstages: {r: {kind: reward_model, config: {lr: .inf}}}\n", "stages.r.config.lr: Input should be a finite number"),
    ("name: t\nstages: {r: {kind: reward_model, config: {hidden_size: 1000000000}}}\n", "stages.r.config.hidden_size: Input should be less than"),
    ("name: t\nstages: {o: {kind: opd, config: {student: x, teachers: [{model: x, domains: [math]}], data: [{}], "
     "lr: 1e400}}}\n", "stages.o.config.lr: Input should be a finite number, got '1e400'"),
    ("name: t\nstages: {e: {kind: eval, config: {models: [], max_new_tokens: 1000000000}}}\n",
     "stages.e.config.max_new_tokens: Input should be less than or equal to 1048576"),
])
def test_bad_number_is_one_line_at_validate(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_cli_rejects_infinite_lr(tmp_path):
    f = tmp_path / "wf.yaml"
    f.write_text(SFT % "lr: 1e400")
    msg = one_line_error(cli("validate", f))
    assert msg == f"error: {f}: stages.sft.config.lr: Input should be a finite number, got '1e400'"


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint whose weights hold a NaN: the realistic way a run diverges from its first step."""
    import torch

    from experts.data import DataConfig, load_samples, sample_texts
    from experts.models import build_tiny_model, save_checkpoint, train_tokenizer

    tok = train_tokenizer(sample_texts(load_samples(DataConfig(**ARITH), "all")), vocab_size=320)
    model = build_tiny_model(tok, **TINY)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("nan") / "model")


def test_nan_loss_fails_the_sft_stage_naming_the_step(tmp_path, nan_checkpoint):
    f = tmp_path / "wf.yaml"
    f.write_text(f"name: nan\nstages:\n  sft: {{kind: sft, config: {{model: {nan_checkpoint}, data: {DATA}, steps: 3, "
                 f"batch_size: 4, save_every: 1}}}}\n")
    runs = tmp_path / "runs"
    msg = one_line_error(cli("run", f, "--runs-dir", runs))
    assert msg.startswith("error: stage 'sft' (sft): loss is nan at step 1"), msg
    assert "training diverged" in msg
    assert not (runs / "nan" / "sft" / "DONE.json").exists()
    assert not (runs / "nan" / "sft" / "checkpoints").exists()  # the diverged step never reached a checkpoint


def test_every_learner_refuses_a_non_finite_step(tmp_path, nan_checkpoint, tiny_base, ray_session):
    """SFT, the GRPO learner, the reward model and OPD each stop at the step, before the optimizer moves."""
    import torch

    from distill import opd
    from experts import grpo, sft
    from experts.data import DataConfig, load_samples
    from experts.models import load_tokenizer
    from learner.group import WorkerGroup
    from learner.optim import NonFiniteLoss
    from pipeline.context import StageContext
    from experts import reward_model

    cfg = sft.Config(model=str(nan_checkpoint))
    group = WorkerGroup(str(nan_checkpoint), cfg.learner, sft.optim(cfg), local=True)
    tok = load_tokenizer(nan_checkpoint)
    rows = sft.build_rows(tok, load_samples(DataConfig(**ARITH))[:4], 64, packing=False)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 1"):
        sft.train_step(group, rows, cfg, tok.pad_token_id)

    # GRPO: a reference policy whose log-probs are NaN (kl_coef > 0) poisons the loss.
    g = grpo.GRPOLearner(str(tiny_base), grpo.Config(model=str(tiny_base), kl_coef=0.1), local=True)
    before = g.group.state_dict()
    batch = {"input_ids": torch.randint(0, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "loss_mask": torch.ones(2, 5), "rollout_logp": torch.zeros(2, 5), "advantages": torch.tensor([1.0, -1.0])}
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 1"):
        g.train_step(batch, ref_logp=torch.full((2, 5), float("nan")))
    assert all(torch.equal(v, before[k]) for k, v in g.group.state_dict().items())

    ctx = StageContext("t", "rm", tmp_path / "rm")
    ctx.out_dir.mkdir()
    with pytest.raises(NonFiniteLoss, match="at step 1"):
        reward_model.run(reward_model.Config(model=str(nan_checkpoint), n_pairs=20, steps=2, batch_size=2), ctx)
    assert not (ctx.out_dir / "model").exists()

    # OPD: a teacher with NaN weights gives NaN hidden states, so NaN divergence and gradients.
    ctx = StageContext("t", "opd", tmp_path / "opd")
    ctx.out_dir.mkdir()
    cfg = opd.Config(student=str(tiny_base), teachers=[{"model": str(nan_checkpoint), "domains": ["math"]}],
                     data=[{**ARITH, "size": 40, "heldout": 4}], rounds=1, prompts_per_round=4, rollout={"max_new_tokens": 4})
    with pytest.raises(NonFiniteLoss, match="is nan at round 1 step 1"):
        opd.run(cfg, ctx, local=True)
    assert not (ctx.checkpoint_dir / "step_1").exists()


# ---- 3. the YAML itself

GOOD = f"name: t\nstages:\n  base: {OK_STAGE}\n"


@pytest.mark.parametrize("text, expected", [
    ("name: t\nstages: {}\n", "stages: no stages"),
    ("name: t\n", "stages: required field is missing"),
    (GOOD + f"  base: {OK_STAGE}\n", "line 4, column 3: duplicate key 'base' (first at line 3)"),
    (GOOD + "name: u\n", "line 4, column 1: duplicate key 'name' (first at line 1)"),
    ("name: t\nstages:\n  base: {kind: base_model, config: {vocab_size: 300, vocab_size: 400}}\n",
     "line 3, column 54: duplicate key 'vocab_size' (first at line 3)"),
    ("name: t\nstages: &s\n  a: [*s]\n", "line 2: a YAML alias refers to a node that contains it"),
    ("name: t\nstages:\n  base: {kind: base_model}\n" + "x: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_bad_yaml_is_one_line(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_yaml_merge_keys_may_still_override(tmp_path):
    f = tmp_path / "wf.yaml"
    f.write_text("name: t\nstages:\n  base: {<<: {kind: sft, config: {}}, kind: base_model}\n")
    assert load_workflow(f).stages["base"].kind == "base_model"


def test_alias_bomb_is_refused_fast(tmp_path):
    """380 bytes that PyYAML's aliases expand to 9^7 strings: refused before anything expands."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
    f = tmp_path / "wf.yaml"
    f.write_text("name: t\n" + "\n".join(lines) + f"\nstages: {{base: {{kind: base_model, config: "
                 f"{{tokenizer_data: [{{task_args: {{x: *a6}}}}]}}}}}}\n")
    t0 = time.perf_counter()
    msg = one_line_error(cli("validate", f))
    assert "aliases expand to more than 100000 YAML nodes" in msg
    assert time.perf_counter() - t0 < 30  # was 11 s of work and 675 MB, now no more than an import


def test_aliases_in_shipped_workflows_still_load():
    assert len(load_workflow(REPO / "workflows" / "experts.yaml").stages) > 5


def test_oversized_workflow_file_is_refused(tmp_path):
    msg = error_of(tmp_path, GOOD + "# " + "x" * MAX_YAML_BYTES + "\n")
    assert f"larger than {MAX_YAML_BYTES} bytes" in msg


def test_garbage_checkpoint_config_is_caught_at_validate(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for garbage, expected in ((b"{not json", "config.json is not valid JSON"), (b"[1, 2]", "no 'model_type'"),
                              (b"\xff\xfe", "config.json is not valid JSON")):
        (ckpt / "config.json").write_bytes(garbage)
        msg = error_of(tmp_path, GOOD.replace("{vocab_size: 300}", f"{{pretrained: {ckpt}}}"))
        assert "stages.base.config.pretrained" in msg and expected in msg


def test_run_time_data_error_is_one_line_naming_the_stage_file_and_line(tmp_path, tiny_base):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1", "completion": "2"}\n5\n')
    f = tmp_path / "wf.yaml"
    f.write_text(f"name: d\nstages:\n  sft: {{kind: sft, config: {{model: {tiny_base}, "
                 f"data: {{source: jsonl, path: {data}, heldout: 0}}, steps: 2}}}}\n")
    msg = one_line_error(cli("run", f, "--runs-dir", tmp_path / "runs"))
    log = tmp_path / "runs" / "d" / "sft" / "stage.log"
    assert msg == f"error: stage 'sft' (sft): {data}:2: expected a JSON object with 'messages' or 'prompt', got a number; log: {log}"
    assert not (tmp_path / "runs" / "d" / "sft" / "DONE.json").exists()


# ---- 4. one run of a workflow at a time

def test_second_run_of_a_workflow_is_refused_naming_the_holder(tmp_path):
    f = tmp_path / "wf.yaml"
    f.write_text(f"name: locked\nstages:\n  base: {{kind: base_model, config: {{tokenizer_data: [{DATA}], "
                 f"vocab_size: 300}}}}\n  sft: {{kind: sft, needs: [base], config: {{model: base, data: {DATA}, "
                 f"steps: 100000, batch_size: 4, save_every: 100000}}}}\n")
    runs = tmp_path / "runs"
    lock = runs / "locked" / LOCK_FILE
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(f), "--runs-dir", str(runs)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (lock.exists() and f"pid {first.pid} " in lock.read_text()):
            assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        t0 = time.perf_counter()
        for cmd in (("run", f), ("run", f, "--stage", "sft", "--force")):
            msg = one_line_error(cli(*cmd, "--runs-dir", runs))
            assert f"another run of this workflow is in progress (pid {first.pid} on" in msg
        assert time.perf_counter() - t0 < 60  # refused at once, not after waiting or starting Ray
        assert first.poll() is None  # and the first run goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    with workflow_lock(runs / "locked"):  # SIGKILL released it
        with pytest.raises(UserError, match=f"pid {os.getpid()} on"):  # held: refused, even to ourselves
            with workflow_lock(runs / "locked"):
                pass
        with workflow_lock(runs / "other"):  # another workflow in the same runs dir is not blocked
            pass
