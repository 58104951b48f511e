"""What a backend returns (`Completion`), one assistant turn (`Turn`), and what trainers read (`Rollout`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Completion:
    """One completion of a token prompt."""

    ids: list[int]  # new tokens, up to and including the stop token when one was produced
    logprobs: list[float]  # log pi(token) under softmax(logits / temperature) (1.0 when greedy), one per id
    stopped: bool  # False when cut off by the token limit


@dataclass
class Turn:
    """One assistant turn's tokens: `ids` with `mask` (0 on forced tokens) and rollout log-probs."""

    ids: list[int]
    mask: list[int]
    logprobs: list[float]
    finished: bool


@dataclass
class Rollout:
    """One sampled response (or agent episode) for one prompt, ready to score, train on or distil."""

    sample: dict  # the prompt's sample: {id, domain, messages, answer, meta}
    group: int  # which prompt of this batch it answers; its G siblings share the number
    prompt_ids: list[int]
    response_ids: list[int]  # everything after the prompt: sampled, forced and tool-result tokens
    loss_mask: list[int]  # 1 where the model sampled the token; 0 on forced and tool-result tokens
    logprobs: list[float]  # the rollout engine's log pi for each response token (0.0 where masked)
    text: str  # what the rewards read: the (last) assistant message, markup kept
    finished: bool  # ended with end-of-turn rather than a token limit
    turns: int = 1
    episode: dict | None = None  # agent episodes: {reward, turns, messages, check} for rewards.agent
    extra: dict = field(default_factory=dict)

    @property
    def sample_id(self) -> str:
        return str(self.sample["id"])

    @property
    def domain(self) -> str:
        return self.sample["domain"]

    def reward_sample(self) -> dict:
        """The sample dict a reward scores (rewards' one interface)."""
        meta = dict(self.sample.get("meta") or {})
        if self.episode is not None:
            meta["episode"] = self.episode
        return {**self.sample, "completion": self.text, "meta": meta}
