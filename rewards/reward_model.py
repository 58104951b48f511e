"""The `reward_model` reward: a Bradley-Terry reward model's scalar score of each sample's visible answer.

The model is trained by the `reward_model` stage (`experts.reward_model`); `LearnedReward(path)`
serves it. `render` is the text both read: the prompt and the answer in the chat template.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from rewards.base import RewardResult, Sample
from rewards.format import answer_text


def render(tokenizer, messages: Sequence[dict[str, Any]], answer: str) -> str:
    """The text the RM reads: the prompt and the answer in the chat template."""
    return tokenizer.apply_chat_template(list(messages) + [{"role": "assistant", "content": answer}], tokenize=False)


def score_texts(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 32) -> torch.Tensor:
    """Scalar rewards for `texts`  # [len(texts)]"""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        out.append(model(**enc).logits[:, 0])
    return torch.cat(out) if out else torch.zeros(0)


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood that chosen beats rejected, averaged  # [pairs] -> []

    >>> round(bt_loss(torch.tensor([0.0]), torch.tensor([0.0])).item(), 4)  # log 2: no preference yet
    0.6931
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean()


class LearnedReward:
    """The `reward_model` reward: a trained RM's scalar score of each sample's visible answer."""

    name = "reward_model"

    def __init__(self, path: str, batch_size: int = 32, max_length: int = 512, sigmoid: bool = False):
        """`sigmoid`: score sigmoid(r), the Bradley-Terry probability that the answer beats one scored 0,
        bounded in (0, 1). A raw score is unbounded: beside a checker's 0/1 reward, even a small weight
        lets the policy chase the RM instead of the checker."""
        from transformers import AutoModelForSequenceClassification

        from experts.models import load_tokenizer

        self.tokenizer = load_tokenizer(path)
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        if not isinstance(sigmoid, bool):
            raise ValueError(f"reward_model: option 'sigmoid' is true or false, not {sigmoid!r}")
        self.batch_size, self.max_length, self.sigmoid = batch_size, max_length, sigmoid

    def __call__(self, samples: Sequence[Sample]) -> list[RewardResult]:
        texts = [render(self.tokenizer, s.get("messages") or [], answer_text(s["completion"])) for s in samples]
        with torch.no_grad():
            scores = score_texts(self.model, self.tokenizer, texts, self.max_length, self.batch_size)
        if self.sigmoid:
            scores = torch.sigmoid(scores)
        return [RewardResult(float(x)) for x in scores]
