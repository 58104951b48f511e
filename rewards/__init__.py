"""Rewards for the GRPO experts: a batch of samples in, one `RewardResult` per sample out.

By name (what a stage's YAML writes under `rewards.weights`):
  math          final answer vs gold with math-verify (`rewards.math_answer`; eval: `math_correct`)
  code          the last ```python block run with its unit tests in the sandbox pool (`rewards.code_tests`)
  instruction   verifiable IFEval-style constraints from `meta["constraints"]` (`rewards.instruction`)
  agent         the task's check script run in the episode's sandbox session (`rewards.agent`)
  format        think block closed, tool calls valid, answer present (`rewards.format`)
  reward_model  a learned Bradley-Terry scorer trained by the `reward_model` stage (`rewards.reward_model`)

`RewardSpec` is the config shape, `CombinedReward` the weighted sum with failures isolated,
`rewards.workers.RayRewardPool` the same on Ray actors. `rewards.if_data` makes IF prompts,
SFT targets and preference pairs.
"""

from rewards.base import REWARDS, RewardResult, make_reward, register
from rewards.combine import CombinedReward, RewardSpec

__all__ = ["REWARDS", "RewardResult", "make_reward", "register", "CombinedReward", "RewardSpec"]
