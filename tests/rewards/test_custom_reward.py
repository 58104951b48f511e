"""A user names their own reward by import path, and a bad one is one line at validate time."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config import UserError, load_workflow
from rewards.base import RewardResult
from rewards.combine import CombinedReward, RewardSpec

REPO = Path(__file__).resolve().parents[2]

MODULE = '''
from rewards.base import RewardResult

def exact(samples):
    """1 if the completion is the gold answer."""
    return [RewardResult(float(s["completion"].strip() == s["answer"]), None if s["completion"].strip() == s["answer"]
                         else "not the answer") for s in samples]

def length_floats(samples, per_char=0.1):
    """TRL style: plain floats, None where it does not apply (no completion to measure)."""
    return [None if not s["completion"] else per_char * len(s["completion"]) for s in samples]

class Contains:
    def __init__(self, word, bonus=1.0):
        self.word, self.bonus = word, bonus

    def __call__(self, samples):
        return [RewardResult(self.bonus * (self.word in s["completion"])) for s in samples]

def no_batch():
    return []

class NoCall:
    pass

NOT_CALLABLE = 3
'''

WORKFLOW = """
name: t
stages:
  base: {kind: base_model, config: {vocab_size: 300}}
  grpo:
    kind: grpo
    needs: [base]
    config:
      model: base
      data: {domain: math, source: generator, task: "experts.tasks:echo_samples", size: 20, heldout: 2}
      rewards: {weights: {"REWARD": 1.0}OPTIONS}
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def workflow(tmp_path: Path, reward: str, options: str = "") -> Path:
    f = tmp_path / "wf.yaml"
    f.write_text(WORKFLOW.replace("REWARD", reward).replace("OPTIONS", f", options: {options}" if options else ""))
    return f


def test_custom_rewards_score_samples_through_the_combined_reward(user_module):
    spec = RewardSpec(
        weights={"my_rewards:exact": 1.0, "my_rewards:Contains": 0.5, "my_rewards:length_floats": 1.0, "format": 0.0},
        options={"my_rewards:Contains": {"word": "42"}, "my_rewards:length_floats": {"per_char": 0.25}},
    )
    reward = CombinedReward(spec)
    right, wrong, empty = reward([{"id": 0, "completion": "42", "answer": "42"},
                                  {"id": 1, "completion": "41", "answer": "42"},
                                  {"id": 2, "completion": "", "answer": "42"}])
    assert right.score == pytest.approx(1.0 + 0.5 + 0.25 * 2)
    assert wrong.score == pytest.approx(0.0 + 0.0 + 0.25 * 2) and "not the answer" in wrong.reason
    # None: the length reward does not apply; the sample has no score from it and is not in its metric.
    assert "my_rewards:length_floats" not in empty.details and not empty.details.get("failed")
    m = reward.metrics([right, wrong, empty])
    assert m["reward/my_rewards:exact"] == pytest.approx(1 / 3)
    assert m["reward/my_rewards:length_floats"] == pytest.approx(0.5)
    assert m["reward/my_rewards:length_floats/failed"] == 0.0


def test_a_good_custom_reward_validates(user_module, tmp_path):
    wf = load_workflow(workflow(tmp_path, "my_rewards:Contains", '{"my_rewards:Contains": {word: "42"}}'))
    assert "grpo" in wf.stages


@pytest.mark.parametrize("reward, options, expected", [
    ("my_rewards:nope", "", "rewards.weights: Value error, reward 'my_rewards:nope': module 'my_rewards' has no "
                            "attribute 'nope', got {'my_rewards:nope': 1.0}"),
    ("my_rewards:NOT_CALLABLE", "", "rewards.weights: Value error, reward 'my_rewards:NOT_CALLABLE': int object is "
                                    "not callable"),
    ("my_rewards:no_batch", "", "rewards.weights: Value error, reward 'my_rewards:no_batch': no_batch cannot be "
                                "called with one batch of samples"),
    ("my_rewards:NoCall", "", "reward 'my_rewards:NoCall': class NoCall has no __call__(self, samples)"),
    ("my_rewards:Contains", "", "rewards: Value error, my_rewards:Contains: 'word' has no value; a reward is called "
                                "with one batch of samples, its other parameters come from rewards.options"),
    ("my_rewards:Contains", '{"my_rewards:Contains": {word: x, wrd: y}}', "rewards.options: Value error, "
                                                                          "my_rewards:Contains: unknown option 'wrd'"),
    ("no_such_pkg.mod:exact", "", "reward 'no_such_pkg.mod:exact': cannot import 'no_such_pkg.mod' "
                                  "(ModuleNotFoundError: No module named 'no_such_pkg')"),
    ("exakt", "", "rewards.weights: Value error, unknown reward 'exakt'; known rewards: "),
])
def test_a_bad_custom_reward_is_one_line_naming_field_and_value(user_module, tmp_path, reward, options, expected):
    with pytest.raises(UserError) as e:
        load_workflow(workflow(tmp_path, reward, options))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'wf.yaml'}: stages.grpo.config.rewards"), msg
    assert expected in msg, msg


def test_validate_command_exits_2_with_one_line_for_a_bad_path(tmp_path):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(MODULE))
    env_path = f"{tmp_path}:{REPO}"
    bad = workflow(tmp_path, "my_rewards:exactly")
    r = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(bad)], cwd=REPO, capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": env_path})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"error: {bad}: stages.grpo.config.rewards.weights: Value error, reward "
                                "'my_rewards:exactly': module 'my_rewards' has no attribute 'exactly', "
                                "got {'my_rewards:exactly': 1.0}")
    assert "Traceback" not in r.stderr


def test_plain_results_and_reward_results_mix_in_one_batch():
    spec = RewardSpec(weights={"tests.rewards.test_custom_reward:mixed": 2.0})
    a, b = CombinedReward(spec)([{"id": 0, "completion": "x"}, {"id": 1, "completion": "y"}])
    assert (a.score, b.score) == (1.0, 3.0)


def mixed(samples):
    """A reward in an installed (importable) module: a float for one sample, a RewardResult for the other."""
    return [0.5 if s["id"] == 0 else RewardResult(1.5, "bonus") for s in samples]


def test_a_custom_reward_the_ray_workers_cannot_import_stops_the_run_naming_it(user_module, ray_session):
    """On sys.path in the driver only (not PYTHONPATH), the reward workers cannot build it: one clear error,
    not a run whose every sample scores 0."""
    from rewards.workers import RayRewardPool

    pool = RayRewardPool(RewardSpec(weights={"my_rewards:exact": 1.0}), num_workers=1, num_cpus=0.5)
    try:
        with pytest.raises(UserError, match=r"reward workers cannot build the rewards: .*my_rewards.*PYTHONPATH"):
            pool([{"id": 0, "completion": "42", "answer": "42"}])
    finally:
        pool.close()
