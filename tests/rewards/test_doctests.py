"""Every example in the rewards' docstrings runs and prints what it says."""

import doctest
import importlib

import pytest

MODULES = ["rewards.base", "rewards.format", "rewards.math_answer", "rewards.instruction", "rewards.combine", "rewards.if_data", "rewards.reward_model", "rewards.code_tests", "rewards.agent"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
