"""A real (tiny, untrained) checkpoint drives an episode end to end through `--policy CHECKPOINT`."""

import json
import subprocess
import sys
from pathlib import Path

from experts.models import build_tiny_model, save_checkpoint, train_tokenizer
from sandbox.episode import HFPolicy, load_task, run_episode
from sandbox.toolcall import tool_message
from sandbox.toolcall import format_call, tools_prompt

TASKS = Path(__file__).resolve().parents[2] / "sandbox" / "tasks"


def tiny_checkpoint(path: Path) -> Path:
    texts = [tools_prompt(), format_call("bash", command="ls -la"), "print('hello')"] * 20
    tok = train_tokenizer(texts, vocab_size=400)
    return save_checkpoint(build_tiny_model(tok, num_hidden_layers=1, hidden_size=32, intermediate_size=64), tok, path)


def test_a_checkpoint_policy_plays_an_episode_and_gets_scored(pool, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    task = load_task(TASKS / "create_file.yaml")
    policy = HFPolicy(ckpt, max_new_tokens=16)
    # Transcript tool messages are bare; our template adds the markers exactly once.
    msgs = [{"role": "user", "content": "hi"}, tool_message("out")]
    rendered = policy.tokenizer.apply_chat_template(msgs, tokenize=False)
    assert rendered.count("<|tool_result|>out<|/tool_result|>") == 1
    ep = run_episode(task, policy, pool, transcript=tmp_path / "t.jsonl")
    # Untrained: it will not solve the task, but every turn is generated, parsed and scored.
    assert ep["reward"] == 0.0 and ep["messages"][2]["role"] == "assistant"
    assert json.loads((tmp_path / "t.jsonl").read_text().splitlines()[-1])["type"] == "reward"
    r = subprocess.run([sys.executable, "-m", "sandbox", "episode", str(TASKS / "create_file.yaml"),
                        "--policy", str(ckpt), "--out", str(tmp_path / "cli.jsonl")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "reward 0.0" in r.stdout, r.stderr
