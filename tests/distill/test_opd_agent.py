"""OPD distils agent prompts as whole sandbox episodes, on the tokens the student wrote."""

import json

import pytest
import torch

import distill.opd
import rollout.worker
from distill.cache import CacheReader
from distill.opd import Config, run
from experts.data import DataConfig, load_samples, sample_texts
from experts.models import build_tiny_model, save_checkpoint, train_tokenizer
from pipeline.context import StageContext
from rollout.types import Completion
from sandbox import toolcall
from tests.conftest import sandbox_image_ok
from tests.distill.conftest import TINY


pytestmark = pytest.mark.skipif(not sandbox_image_ok(), reason="needs Docker and the sandbox image (python -m sandbox build-image)")


class FirstTurnCallsATool:
    """The student's own backend, except that an episode's first turn is a tool call (`seq 3`): a tiny
    random student never writes one, and the test needs episodes with tool results in them."""

    def __init__(self, backend, tokenizer):
        self.backend = backend
        self.result_id = tokenizer.convert_tokens_to_ids(toolcall.RESULT_OPEN)
        self.call = tokenizer(toolcall.format_call("bash", command="seq 3"), add_special_tokens=False)["input_ids"]
        self.call.append(tokenizer.eos_token_id)

    def complete(self, prompts, max_new_tokens, stop_ids):
        out = self.backend.complete(prompts, max_new_tokens, stop_ids)
        return [o if self.result_id in p else Completion(self.call, [0.0] * len(self.call), True)
                for p, o in zip(prompts, out)]

    def __getattr__(self, name):  # weight sync and the probe go to the real engine
        return getattr(self.backend, name)


@pytest.fixture(scope="module")
def agent_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("agent_opd")
    agent = DataConfig(domain="agent", source="generator", task="experts.tasks:agent_samples", size=12, heldout=2,
                       task_args={"system": "Use tools."})
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"id": f"c{i}", "domain": "chat", "prompt": f"Say hello {i}."}) + "\n"
                            for i in range(8)))
    chat = DataConfig(domain="chat", source="jsonl", path=str(chat), heldout=2)
    tok = train_tokenizer(sample_texts(load_samples(agent, "all")) + ["Say hello."] * 5, vocab_size=400)
    student = save_checkpoint(build_tiny_model(tok, seed=1, **TINY), tok, root / "student")
    teacher = save_checkpoint(build_tiny_model(tok, seed=2, **TINY), tok, root / "teacher")
    return student, teacher, [agent, chat], tok


def test_agent_prompts_are_distilled_as_whole_episodes_without_tool_results(agent_world, tmp_path, monkeypatch):
    """The teacher reads each episode whole (prompt, every turn, tool results); the cache keeps states
    only where the rollout's loss mask is 1, so tool-result tokens are never distilled."""
    student, teacher, data, tok = agent_world
    real_backend = rollout.worker.make_backend
    monkeypatch.setattr(rollout.worker, "make_backend",
                        lambda *a, **k: FirstTurnCallsATool(real_backend(*a, **k), tok))
    rounds = []
    real_generate = distill.opd.generate_on
    monkeypatch.setattr(distill.opd, "generate_on", lambda *a, **k: rounds.append(real_generate(*a, **k)) or rounds[-1])

    cfg = Config(student=str(student), data=data, rounds=1, prompts_per_round=4, batch_tokens=256,
                 teachers=[{"model": str(teacher), "domains": ["agent"], "name": "agent"},
                           {"model": str(teacher), "domains": ["chat"], "name": "chat"}],
                 rollout={"max_new_tokens": 24}, agent={"max_turns": 2, "max_total_tokens": 160, "sandboxes": 2})
    ctx = StageContext(workflow="toy", name="opd", out_dir=tmp_path, seed=0)
    run(cfg, ctx, local=True)

    rollouts = {r.sample_id: r for r in rounds[0]}
    episodes = [r for r in rollouts.values() if r.domain == "agent"]
    assert len(episodes) == 2 and all(r.turns == 2 for r in episodes), "two turns: the call, then an answer"
    for r in episodes:
        untrained = tok.decode([t for t, m in zip(r.response_ids, r.loss_mask) if m == 0])
        assert toolcall.RESULT_OPEN in untrained and "1\n2\n3" in untrained, "the tool's output is in the episode"
    batches = list(CacheReader(str(tmp_path / "cache" / "rank_00000"), 1))
    cached = [(sid, ids, m) for b in batches for sid, ids, m in zip(b.sample_ids, b.input_ids, b.loss_masks)]
    assert sorted(sid for sid, *_ in cached) == sorted(rollouts)
    for sid, ids, mask in cached:
        r = rollouts[sid]
        assert ids.tolist() == r.prompt_ids + r.response_ids, "the teacher encoded the whole episode"
        assert mask.int().tolist() == r.loss_mask, "the student's own tokens, and only those, are trained"
    trained = sum(sum(r.loss_mask) for r in rollouts.values())
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert sum(b.hidden.shape[0] for b in batches) == metrics["tokens"] == trained, "a state per trained token"
    assert trained < sum(len(r.response_ids) for r in rollouts.values())
    assert metrics["agent/turns_mean"] == 2 and metrics["tokens/domain/agent"] > 0 and metrics["tokens/domain/chat"] > 0
    assert metrics["weight/domain/agent"] == pytest.approx(0.5) and metrics["weight/domain/chat"] == pytest.approx(0.5)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
