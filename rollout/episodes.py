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

The episode itself is `sandbox.episode.Episode`, the stepper `sandbox episode` drives too (set-up,
acting on a turn, observation, check); this module adds what is a rollout's own: the batch, the
tokens and the token limit.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait

from rollout.config import AgentConfig, RolloutConfig
from rollout.turns import complete_turns, render_prompt
from rollout.types import Rollout
from sandbox.episode import Episode, Task

log = logging.getLogger(__name__)


def task_of(sample: dict) -> Task:
    """The sandbox task a sample carries in `meta["task"]` (a dict of `sandbox.episode.Task` fields).

    >>> task_of({"id": "s1", "meta": {"task": {"name": "t", "prompt": "Write a.txt.", "check": "test -f a.txt"}}}).max_turns
    8
    >>> task_of({"id": "s1", "meta": {}})
    Traceback (most recent call last):
    ValueError: agent sample s1 has no meta.task
    """
    task = sample.get("meta", {}).get("task")
    if task is None:
        raise ValueError(f"agent sample {sample.get('id')} has no meta.task")
    return Task.model_validate(task)


def tool_turn_ids(tokenizer, observation: str, think: bool) -> list[int]:
    """Tokens between the model's end-of-turn token and its next turn: what the template writes after
    that token (ChatML: a newline; Llama-3: nothing), the tool turn, the assistant header.

    Rendered by the chat template itself, so the row matches what a re-rendered conversation holds.
    """
    text = tokenizer.apply_chat_template([{"role": "tool", "content": observation}], add_generation_prompt=True,
                                         tokenize=False, enable_thinking=think)
    return tokenizer(after_turn_end(tokenizer) + text, add_special_tokens=False)["input_ids"]


def after_turn_end(tokenizer) -> str:
    """The text the chat template writes right after an assistant turn's end-of-turn (eos) token."""
    reply = "REPLY-7f3a9c"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "u"}, {"role": "assistant", "content": reply}],
                                         tokenize=False)
    at = text.find(reply + tokenizer.eos_token)
    return "\n" if at < 0 else text[at + len(reply) + len(tokenizer.eos_token):]


class _Row:
    """One rollout's tokens beside its episode: the context the model saw, the loss mask, log-probs."""

    def __init__(self, sample: dict, group: int, prompt_ids: list[int], agent: AgentConfig):
        self.sample, self.group, self.prompt_ids = sample, group, prompt_ids
        self.episode = Episode(task_of(sample), sample["messages"], max_turns=agent.max_turns,
                               max_observation_chars=agent.max_observation_chars)
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.finished, self.last_text = True, ""

    def add(self, ids, mask, logprobs):
        self.ids += ids
        self.mask += mask
        self.logprobs += [lp * m for lp, m in zip(logprobs, mask)]


def run_episodes(backend, tokenizer, samples: list[dict], first_group: int, cfg: RolloutConfig, agent: AgentConfig,
                 pool) -> list[Rollout]:
    """G episodes per sample (grouped like single-turn rollouts)."""
    think = cfg.reasoning != "non_think"
    rows = [_Row(s, first_group + g, render_prompt(tokenizer, s["messages"], enable_thinking=think), agent)
            for g, s in enumerate(samples) for _ in range(cfg.group_size)]
    wave = max(1, getattr(pool, "size", agent.sandboxes))
    with ThreadPoolExecutor(wave) as threads:
        for w in range(0, len(rows), wave):
            batch = rows[w : w + wave]
            try:
                opening = [threads.submit(r.episode.open, pool) for r in batch]
                wait(opening)  # every one, so no session is still opening when a failed set-up ends the wave
                for f in opening:
                    f.result()  # a failed setup command: TaskError
                while active := [r for r in batch if not r.episode.done]:
                    limits = [min(cfg.max_new_tokens, agent.max_total_tokens - len(r.ids)) for r in active]
                    turns = complete_turns(backend, tokenizer, [r.prompt_ids + r.ids for r in active], limits, cfg)
                    for r, t in zip(active, turns):
                        r.add(t.ids, t.mask, t.logprobs)
                        r.last_text = tokenizer.decode(t.ids, skip_special_tokens=True)
                        r.finished = t.finished  # cut off mid-turn: the episode ends unfinished
                    observations = list(threads.map(lambda r: r.episode.step(r.last_text, cut=not r.finished), active))
                    for r, obs in zip(active, observations):
                        if obs is None:  # a final answer, or a turn cut off
                            continue
                        tool_ids = tool_turn_ids(tokenizer, obs, think)
                        r.add(tool_ids, [0] * len(tool_ids), [0.0] * len(tool_ids))
                        if len(r.ids) >= agent.max_total_tokens:  # out of tokens: cut, like an overlong response
                            r.episode.done, r.finished = True, False
            finally:
                list(threads.map(lambda r: r.episode.finish(), batch))  # the check; sessions that never opened skip it
    out = [Rollout(r.sample, r.group, r.prompt_ids, r.ids, r.mask, r.logprobs, r.last_text, r.finished,
                   r.episode.turns, r.episode.result()) for r in rows]
    log.info("agent episodes: %d, solved %d, mean turns %.2f", len(out), sum(r.episode["reward"] for r in out),
             sum(r.turns for r in out) / max(1, len(out)))
    return out
