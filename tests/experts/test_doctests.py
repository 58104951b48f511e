"""The examples in the experts' docstrings run as written."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["experts.tasks", "experts.eval", "experts.benchmarks", "rollout.episodes", "experts.grpo", "experts.grpo_loss", "learner.worker", "learner.batching", "learner.optim", "learner.checkpoint"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
