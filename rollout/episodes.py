"""Multi-turn agent rollouts: each rollout is an episode in its own sandbox session.

The model writes reasoning and one XML tool call per turn (`sandbox.toolcall`); the call runs in
the episode's session and its output comes back as a `tool` turn; the episode ends when the model
answers without a call, or at a turn or token limit. Then the task's `check` runs in the same
session (`sandbox.episode.run_check`: the episode's processes killed, check files rewritten, a
clean environment) and decides the reward (1.0 if it exits 0), which `rewards.agent` reads from
`meta["episode"]`.

Everything is kept as tokens, never re-rendered: the training row is exactly the context the
model saw, reasoning of earlier turns included, and tool-result tokens (plus the chat markup
around them) carry loss mask 0, since the model did not write them. Episodes of a wave generate
in one batched call per turn; a wave is as many episodes as the sandbox pool has containers.

Reused from `sandbox`: the task schema (`sandbox.episode.Task`), tool execution and observation
rendering (`execute`), the parser and formatter (`sandbox.toolcall`), the pool and sessions.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from rollout.config import AgentConfig, RolloutConfig
from rollout.turns import complete_turns, render_prompt
from rollout.types import Rollout

log = logging.getLogger(__name__)


def task_of(sample: dict):
    """The sandbox task a sample carries in `meta["task"]` (a dict of `sandbox.episode.Task` fields)."""
    from sandbox.episode import Task

    task = sample.get("meta", {}).get("task")
    if task is None:
        raise ValueError(f"agent sample {sample.get('id')} has no meta.task")
    return Task.model_validate(task)


def tool_turn_ids(tokenizer, observation: str, think: bool) -> list[int]:
    """Tokens between the model's `<|im_end|>` and its next turn: newline, tool turn, assistant header.

    Rendered by the chat template itself, so the row matches what a re-rendered conversation holds.
    """
    text = tokenizer.apply_chat_template([{"role": "tool", "content": observation}], add_generation_prompt=True,
                                         tokenize=False, enable_thinking=think)
    return tokenizer("\n" + text, add_special_tokens=False)["input_ids"]


def clip_observation(text: str, limit: int) -> str:
    """
    >>> clip_observation("abcdef", 4)
    'abcd\\n[output cut at 4 characters]'
    """
    return text if len(text) <= limit else text[:limit] + f"\n[output cut at {limit} characters]"


class _Episode:
    def __init__(self, sample: dict, group: int, prompt_ids: list[int]):
        self.sample, self.group, self.prompt_ids = sample, group, prompt_ids
        self.task = task_of(sample)
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.messages = list(sample["messages"])
        self.turns, self.done, self.finished, self.last_text = 0, False, True, ""
        self.session = None
        self.check: dict = {}

    def add(self, ids, mask, logprobs):
        self.ids += ids
        self.mask += mask
        self.logprobs += [lp * m for lp, m in zip(logprobs, mask)]


def _open(ep: _Episode, pool) -> None:
    from sandbox.episode import TaskError, render_result

    ep.session = pool.session()
    for path, content in ep.task.setup.files.items():
        ep.session.write_file(path, content)
    for cmd in ep.task.setup.commands:
        r = ep.session.exec(cmd, timeout=ep.task.timeout_s)
        if r.exit_code != 0:
            raise TaskError(f"task {ep.task.name}: setup command {cmd!r} failed: {render_result(r)}")


def _act(ep: _Episode, text: str, agent: AgentConfig) -> str | None:
    """Run the turn's tool call; None when the turn is a final answer (no call)."""
    from sandbox import toolcall
    from sandbox.episode import execute

    parsed = toolcall.parse(text)
    if parsed.errors:
        return toolcall.error_observation(parsed.errors)
    if not parsed.calls:
        return None
    return clip_observation(execute(ep.session, parsed.calls[0], ep.task.timeout_s), agent.max_observation_chars)


def _close(ep: _Episode) -> None:
    from sandbox.episode import run_check

    if ep.session is None:  # setup never got a container
        return
    try:
        r = run_check(ep.session, ep.task)  # the hardened check both episode loops share
        ep.check = r.to_dict()
        ep.check["ok"] = r.ok
    finally:
        ep.session.close()


def run_episodes(backend, tokenizer, samples: list[dict], first_group: int, cfg: RolloutConfig, agent: AgentConfig,
                 pool) -> list[Rollout]:
    """G episodes per sample (grouped like single-turn rollouts)."""
    from sandbox import toolcall

    think = cfg.reasoning != "non_think"
    episodes = [_Episode(s, first_group + g, render_prompt(tokenizer, s["messages"], enable_thinking=think))
                for g, s in enumerate(samples) for _ in range(cfg.group_size)]
    wave = max(1, getattr(pool, "size", agent.sandboxes))
    with ThreadPoolExecutor(wave) as threads:
        for w in range(0, len(episodes), wave):
            batch = episodes[w : w + wave]
            list(threads.map(lambda ep: _open(ep, pool), batch))
            try:
                while active := [ep for ep in batch if not ep.done]:
                    limits = [min(cfg.max_new_tokens, agent.max_total_tokens - len(ep.ids)) for ep in active]
                    turns = complete_turns(backend, tokenizer, [ep.prompt_ids + ep.ids for ep in active], limits, cfg)
                    texts = []
                    for ep, t in zip(active, turns):
                        ep.add(t.ids, t.mask, t.logprobs)
                        ep.turns += 1
                        ep.last_text = tokenizer.decode(t.ids, skip_special_tokens=True)
                        ep.messages.append({"role": "assistant", "content": ep.last_text})
                        texts.append(ep.last_text)
                        if not t.finished:  # cut off mid-turn: the episode ends unfinished
                            ep.done, ep.finished = True, False
                    observations = list(threads.map(lambda a: None if a[0].done else _act(a[0], a[1], agent), zip(active, texts)))
                    for ep, obs in zip(active, observations):
                        if ep.done:
                            continue
                        if obs is None:  # a final answer
                            ep.done = True
                            continue
                        ep.messages.append(toolcall.tool_message(obs))
                        tool_ids = tool_turn_ids(tokenizer, obs, think)
                        ep.add(tool_ids, [0] * len(tool_ids), [0.0] * len(tool_ids))
                        if len(ep.ids) >= agent.max_total_tokens:  # out of tokens: cut, like an overlong response
                            ep.done, ep.finished = True, False
                        elif ep.turns >= min(agent.max_turns, ep.task.max_turns):  # out of turns: the check still decides
                            ep.done = True
            finally:
                list(threads.map(_close, batch))
    out = []
    for ep in episodes:
        reward = 1.0 if ep.check.get("ok") else 0.0
        episode = {"task": ep.task.name, "reward": reward, "turns": ep.turns, "messages": ep.messages, "check": ep.check}
        out.append(Rollout(ep.sample, ep.group, ep.prompt_ids, ep.ids, ep.mask, ep.logprobs, ep.last_text,
                           ep.finished, ep.turns, episode))
    log.info("agent episodes: %d, solved %d, mean turns %.2f", len(out), sum(r.episode["reward"] for r in out),
             sum(r.turns for r in out) / max(1, len(out)))
    return out
