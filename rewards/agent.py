"""Agent reward: an episode scores by the sandbox state it leaves behind, less optional step penalties.

The episode runner and task format are the sandbox package's (`sandbox.episode`): a task's
`check` runs in the episode's own session after the last turn, exit 0 meaning solved. A sample
arrives in one of two shapes:

- rolled out: `meta["episode"]` is what `sandbox.episode.run_episode` returned (the GRPO rollout
  already ran the task and its check); nothing runs again here;
- to replay: `meta["task"]` (a task dict, or a path to a task YAML) and `meta["turns"]` (the
  assistant messages; default `[completion]`); the turns are replayed in a fresh session of the
  pool and the check decides.

score = 1.0 if solved else 0.0, minus `step_penalty` per turn and `parse_error_penalty` per turn
whose tool call could not be parsed.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from rewards.base import RewardResult, Sample

log = logging.getLogger(__name__)


def parse_errors(messages: Sequence[dict[str, Any]]) -> int:
    """How many tool observations in an episode report a tool call that could not be parsed.

    >>> parse_errors([{"role": "tool", "content": "<|tool_result|>parse error: x<|/tool_result|>"}])
    1
    """
    return sum(m.get("role") == "tool" and "parse error:" in m.get("content", "")[:40] for m in messages)


def episode_score(episode: dict[str, Any], step_penalty: float = 0.0, parse_error_penalty: float = 0.0) -> RewardResult:
    """Score a finished episode (the dict `run_episode` returns).

    >>> episode_score({"reward": 1.0, "turns": 3, "messages": [], "check": {"exit_code": 0}}, step_penalty=0.1).score
    0.7
    """
    solved = float(episode["reward"])
    errors = parse_errors(episode.get("messages", []))
    score = solved - step_penalty * episode["turns"] - parse_error_penalty * errors
    check = episode.get("check") or {}
    reason = None if solved else f"check failed (exit code {check.get('exit_code')})"
    return RewardResult(round(score, 6), reason, {"solved": solved, "turns": episode["turns"], "parse_errors": errors})


class AgentReward:
    """Whether the agent's episode left the sandbox in the task's solved state (see module doc)."""

    name = "agent"

    def __init__(self, step_penalty: float = 0.0, parse_error_penalty: float = 0.0, pool: Any = None,
                 pool_size: int = 2):
        self.step_penalty, self.parse_error_penalty = step_penalty, parse_error_penalty
        self.pool, self._owns_pool, self.pool_size = pool, pool is None, pool_size

    def _pool(self):
        if self.pool is None:  # this node's sandbox service, else a private pool
            from sandbox.service import node_pool

            self.pool, self._owns_pool = node_pool(self.pool_size)
        return self.pool

    def score_one(self, sample: Sample) -> RewardResult:
        from sandbox.episode import ScriptedPolicy, Task, load_task, run_episode

        meta = sample.get("meta") or {}
        episode = meta.get("episode")
        if episode is None:
            task = meta.get("task")
            if task is None:
                return RewardResult(0.0, "sample has neither meta.episode nor meta.task")
            task = load_task(task) if isinstance(task, (str, Path)) else Task.model_validate(task)
            turns = meta.get("turns") or [sample["completion"]]
            episode = run_episode(task, ScriptedPolicy(turns), self._pool())
        return episode_score(episode, self.step_penalty, self.parse_error_penalty)

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        if all((s.get("meta") or {}).get("episode") is not None for s in samples):
            return [self.score_one(s) for s in samples]
        with ThreadPoolExecutor(max_workers=max(1, self._pool().size), thread_name_prefix="agent-reward") as ex:
            return list(ex.map(self.score_one, samples))

    def close(self) -> None:
        if self._owns_pool and self.pool is not None:
            self.pool.close()
            self.pool = None
