"""What a GRPO step trains on: failed rewards left out, each rollout's own length budget, refills of
uninformative groups, and the prompts each step draws (fixed plan, fresh problems, retired prompts)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from experts.data import DataConfig, load_samples, prompt_key
from experts.grpo import Config, PromptPlan, StepPrompts, group_signal, rollout_groups, score_and_advantages
from learner.batching import batch_plan
from pipeline.config import UserError, load_workflow
from rewards import REWARDS, CombinedReward, RewardResult, RewardSpec
from rollout.config import AgentConfig, RolloutConfig
from rollout.types import Rollout

ECHO = dict(domain="math", source="generator", task="experts.tasks:echo_samples", size=100, heldout=20)


def sample(name: str, domain: str = "math", **meta) -> dict:
    return {"id": name, "domain": domain, "messages": [{"role": "user", "content": name}], "answer": None,
            "meta": meta}


def rollout(s: dict, text: str = "", tokens: int = 4, finished: bool = True, episode: dict | None = None) -> Rollout:
    return Rollout(s, 0, [1, 2], [5] * tokens, [1] * tokens, [-0.1] * tokens, text, finished, episode=episode)


class Checker:
    """A verifier whose service is down for completions that say 'crash'."""

    name = "checker"

    def __call__(self, samples):
        if any("crash" in s["completion"] for s in samples):
            raise RuntimeError("checker unreachable")
        return [RewardResult(float(s["completion"] == "right")) for s in samples]


def test_a_failed_reward_is_left_out_not_scored_zero(monkeypatch):
    """Group 0: right, wrong, (checker down), wrong -> advantages of {1, 0, 0} only: mean 1/3, std 0.57735,
    so +1.1547 and -0.5774 twice; the failed sample trains nothing. Group 1: one counted reward -> nothing."""
    monkeypatch.setitem(REWARDS, "checker", Checker)
    cfg = Config(model="m", rewards=RewardSpec(weights={"checker": 1.0}), prompts_per_step=2,
                 rollout=RolloutConfig(group_size=4))
    a, b = sample("a"), sample("b")
    rollouts = [rollout(a, t) for t in ("right", "wrong", "crash", "wrong")] + \
               [rollout(b, t) for t in ("right", "crash", "crash", "crash")]
    results = CombinedReward(cfg.rewards)([r.reward_sample() for r in rollouts])
    assert [r.score for r in results] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # a failure looks like a 0...
    keep, adv, m = score_and_advantages(rollouts, results, cfg)
    assert keep == [0, 1, 3]  # ...but is not trained on as one
    assert adv == pytest.approx([1.1547, -0.5774, -0.5774], abs=1e-4)
    assert m["rollouts/reward_failed"] == 4 and m["groups/informative"] == 1 and m["rollouts/trained"] == 3
    assert m["reward/mean"] == pytest.approx(0.5)  # over the 4 counted rewards


def test_overlong_penalty_compares_each_rollout_with_its_own_budget():
    """buffer 4, penalty 1: math's budget is its domain's 8 tokens, code's the rollout's 16, an agent
    episode's agent.max_total_tokens 64 (all turns together, not the per-turn 16)."""
    cfg = Config(model="m", overlong="penalty", overlong_buffer=4, prompts_per_step=3,
                 rollout=RolloutConfig(group_size=2, max_new_tokens=16, domains={"math": {"max_new_tokens": 8}}),
                 agent=AgentConfig(max_total_tokens=64))
    math_, code, agent = sample("m"), sample("c", "code"), sample("t", "agent")
    rollouts = [rollout(math_, tokens=8), rollout(math_, tokens=6),  # ramp 4..8: -1, -0.5
                rollout(code, tokens=8), rollout(code, tokens=14),  # ramp 12..16: 0, -0.5
                rollout(agent, tokens=40, episode={"reward": 1.0}), rollout(agent, tokens=64, episode={"reward": 1.0})]
    rewards, counted, informative = group_signal(rollouts, [RewardResult(1.0)] * 6, cfg)
    assert rewards.tolist() == [[0.0, 0.5], [1.0, 0.5], [1.0, 0.0]]
    assert counted.all() and informative.tolist() == [True, True, True]


def fake_generate(calls: list[int]):
    """Grouped like `generate_on`'s, with the reward as text: a prompt's `meta.rewards` gives its G rewards."""
    def generate(prompts, call):
        calls.append(call)
        out = [rollout(s, str(r)) for s in prompts for r in s["meta"]["rewards"]]
        for k, r in enumerate(out):
            r.group = k // len(prompts[0]["meta"]["rewards"])
        return out
    return generate


def fake_score(rollouts):
    return [RewardResult(float(r.text)) for r in rollouts]


def test_refills_generate_again_until_the_batch_has_enough_informative_groups():
    """2 prompts per step, G = 2. Call 0: two tied prompts -> 0 informative, so a refill asks for the
    whole 2; call 1: one informative of 4 groups (share 1/4) -> 1 missing / (1/4) = 4, at most 2; call 2
    is the last allowed (max_refill_calls 2) and brings 2 more informative: 3 in all, the first 2 train."""
    tied, mixed = [1, 1], [0, 1]
    supply = [sample(f"p{i}", rewards=r) for i, r in enumerate([tied, tied, mixed, tied, mixed, mixed, mixed])]
    cfg = Config(model="m", prompts_per_step=2, rollout=RolloutConfig(group_size=2), max_refill_calls=2)
    calls: list[int] = []
    times: dict[str, float] = {}
    rollouts, results, m = rollout_groups(cfg, StepPrompts(iter(supply), lambda s: False).take, fake_generate(calls),
                                          fake_score, times)
    assert calls == [0, 1, 2] and m == {"refill/generate_calls": 2.0, "refill/groups_drawn": 4.0}
    assert [r.group for r in rollouts] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # numbered over the step
    assert {"time/generate", "time/score"} <= set(times)
    keep, adv, more = score_and_advantages(rollouts, results, cfg)
    assert [rollouts[i].sample["id"] for i in keep] == ["p2", "p2", "p4", "p4"]  # p5, the surplus, is left out
    assert more["groups/informative"] == 2 and more["groups/total"] == 6 and more["groups/zero_variance_dropped"] == 3

    # Enough informative groups at once: no refill. max_refill_calls 0: today's drop-only behaviour.
    for first, refills, want_calls in ((supply[4:], 2, [0]), (supply, 0, [0])):
        calls = []
        cfg = Config(model="m", prompts_per_step=2, rollout=RolloutConfig(group_size=2), max_refill_calls=refills)
        _, _, m = rollout_groups(cfg, StepPrompts(iter(first), lambda s: False).take, fake_generate(calls), fake_score, {})
        assert calls == want_calls and m["refill/generate_calls"] == 0


def test_without_dynamic_sampling_every_group_trains_and_none_is_refilled():
    supply = [sample("a", rewards=[1, 1]), sample("b", rewards=[0, 1])]
    cfg = Config(model="m", prompts_per_step=2, rollout=RolloutConfig(group_size=2), dynamic_sampling=False)
    calls: list[int] = []
    rollouts, results, m = rollout_groups(cfg, StepPrompts(iter(supply), lambda s: False).take, fake_generate(calls),
                                          fake_score, {})
    keep, adv, _ = score_and_advantages(rollouts, results, cfg)
    assert calls == [0] and keep == [0, 1, 2, 3] and adv == pytest.approx([0, 0, -0.7071, 0.7071], abs=1e-4)


def test_a_step_draws_its_plan_then_refills_from_a_stream_of_its_own():
    samples = [sample(f"p{i}") for i in range(10)]
    cfg = Config(model="m", prompts_per_step=3, steps=4)
    plan = PromptPlan(cfg, samples, seed=5)
    supply = plan.supply(1)
    own = supply.take(3)
    assert own == [samples[i] for i in batch_plan(10, 3, 4, 5)[1]]  # what the fixed plan always gave
    rest = supply.take(100)
    assert len(rest) == 7 and not {s["id"] for s in rest} & {s["id"] for s in own}
    assert plan.supply(1).take(10) == own + rest  # fixed by seed and step: a resumed run draws the same


def groups(prompts: list[dict], tied: set[str]):
    """One step's rollouts and results: a prompt in `tied` scores [1, 1], the others [0, 1]."""
    rollouts = [rollout(s, str(r)) for s in prompts for r in ([1, 1] if s["id"] in tied else [0, 1])]
    return rollouts, fake_score(rollouts)


def run_steps(plan: PromptPlan, steps: range, tied: set[str], save_at: int | None = None, ckpt=None):
    """Each step: take 3 prompts, record their groups; returns what each step drew and the last metrics."""
    drawn, m = [], {}
    for step in steps:
        supply = plan.supply(step)
        prompts = supply.take(3)
        assert len(prompts) == 3 and not any(plan.retired(s) for s in prompts)  # retired ones are passed over
        drawn.append([s["id"] for s in prompts])
        m = plan.record(*groups(prompts, tied), supply)
        if step + 1 == save_at:
            plan.save(ckpt, step + 1)
            (ckpt / f"step_{step + 1}").mkdir()
    return drawn, m


def test_prompts_tied_k_times_in_a_row_are_skipped_and_the_history_resumes(tmp_path):
    samples = [sample(f"p{i}") for i in range(10)]
    tied = {"p0", "p1", "p2", "p3"}
    cfg = Config(model="m", prompts_per_step=3, steps=8, rollout=RolloutConfig(group_size=2), skip_uninformative_after=2)
    drawn, m = run_steps(PromptPlan(cfg, samples, seed=0), range(8), tied, save_at=5, ckpt=tmp_path)
    assert m["prompts/retired"] == 4 and m["prompts/skipped"] > 0
    assert drawn != [[samples[i]["id"] for i in idx] for idx in batch_plan(10, 3, 8, 0)]  # the plan was changed
    resumed = PromptPlan(cfg, samples, seed=0, history=PromptPlan.history(tmp_path / "step_5"))
    assert run_steps(resumed, range(5, 8), tied)[0] == drawn[5:]  # what the uninterrupted run drew

    # an informative group resets the count: tied, informative, tied is not 2 in a row
    plan = PromptPlan(cfg, samples, seed=0)
    for t in ({"p9"}, set(), {"p9"}):
        plan.record(*groups([samples[9]], t), StepPrompts(iter([]), plan.retired))
    assert not plan.retired(samples[9]) and list(plan.streaks.values()) == [1]


def test_history_files_follow_the_checkpoints_kept(tmp_path):
    cfg = Config(model="m", skip_uninformative_after=1)
    plan = PromptPlan(cfg, [sample("a")], seed=0)
    plan.streaks = {"x": 1}
    plan.save(tmp_path, 5)
    (tmp_path / "step_5").mkdir()
    plan.save(tmp_path, 10)
    (tmp_path / "step_10").mkdir()
    assert sorted(f.name for f in tmp_path.glob("prompt_history_*")) == ["prompt_history_step_10.json",
                                                                         "prompt_history_step_5.json"]
    (tmp_path / "step_5").rmdir()  # the learner dropped the older checkpoint
    plan.save(tmp_path, 15)
    assert sorted(f.name for f in tmp_path.glob("prompt_history_*")) == ["prompt_history_step_10.json",
                                                                         "prompt_history_step_15.json"]
    assert PromptPlan.history(tmp_path / "step_10") == {"x": 1} and PromptPlan.history(tmp_path / "step_5") is None
    PromptPlan(Config(model="m"), [sample("a")], seed=0).save(tmp_path / "off", 5)  # retiring off: nothing to save
    assert not (tmp_path / "off").exists()


def test_fresh_prompts_are_new_problems_each_step_and_never_held_out():
    data = DataConfig(**ECHO)
    cfg = Config(model="m", data=data, fresh_prompts=True, prompts_per_step=8)
    plan = PromptPlan(cfg, load_samples(data), seed=0)
    heldout = {prompt_key(s) for s in load_samples(data, "heldout")}
    step0 = plan.supply(0)
    first, refill = step0.take(8), step0.take(8)
    assert plan.supply(0).take(16) == first + refill  # fixed by seeds: resumable
    later = [s for step in range(1, 6) for s in plan.supply(step).take(8)]
    assert {s["id"] for s in first}.isdisjoint(s["id"] for s in later)  # new problems each step
    assert not any(prompt_key(s) in heldout for s in first + refill + later)


def test_fresh_prompts_cannot_repeat_a_heldout_prompt_even_in_a_tiny_space():
    """One digit: 9 distinct prompts, 3 held out; every fresh draw is one of the 6 others."""
    data = DataConfig(**{**ECHO, "size": 60, "heldout": 3, "task_args": {"digits": 1}})
    train, heldout = load_samples(data), load_samples(data, "heldout")
    plan = PromptPlan(Config(model="m", data=data, fresh_prompts=True, prompts_per_step=6), train, seed=0)
    drawn = {prompt_key(s) for step in range(3) for s in plan.supply(step).take(6)}
    assert drawn == {prompt_key(s) for s in train} and not drawn & {prompt_key(s) for s in heldout}


def test_fresh_prompts_of_several_domains_share_a_step():
    code = DataConfig(domain="code", source="generator", task="experts.tasks:code_samples", size=100, heldout=10)
    cfg = Config(model="m", data=[DataConfig(**ECHO), code], fresh_prompts=True, prompts_per_step=8)
    plan = PromptPlan(cfg, [], seed=0)
    domains = [s["domain"] for step in range(3) for s in plan.supply(step).take(8)]
    assert len(domains) == 24 and {"math", "code"} == set(domains)


def test_fresh_prompts_need_generating_sources():
    with pytest.raises(ValidationError, match=r"fresh_prompts: data.1 has source 'jsonl', which cannot make new problems"):
        Config(model="m", data=[DataConfig(**ECHO), DataConfig(source="jsonl", path="x.jsonl")], fresh_prompts=True)


def test_the_renamed_scale_adv_by_std_says_what_to_write(tmp_path):
    f = tmp_path / "wf.yaml"
    f.write_text("name: t\nstages:\n  base: {kind: base_model, config: {vocab_size: 300}}\n"
                 "  g: {kind: grpo, needs: [base], config: {model: base, scale_adv_by_std: false}}\n")
    with pytest.raises(UserError, match=r"stages.g.config: Value error, scale_adv_by_std is now scale_rewards "
                                        r"\(group, batch or none\): write scale_rewards: none"):
        load_workflow(f)


def test_mix_gives_each_domain_its_share_of_a_steps_prompts():
    """grpo.mix: a mixed model's step holds each domain as its expert's steps did, fixed plan or fresh problems."""
    code = DataConfig(domain="code", source="generator", task="experts.tasks:code_samples", size=100, heldout=10)
    samples = [sample(f"m{i}") for i in range(40)] + [sample(f"c{i}", "code") for i in range(5)]
    cfg = Config(model="m", data=[DataConfig(**ECHO), code], prompts_per_step=8, steps=6, mix={"math": 1, "code": 3})
    plan = PromptPlan(cfg, samples, seed=0)
    for step in range(6):
        own = plan.supply(step).take(8)
        assert [s["domain"] for s in own].count("code") == 6, "3 of 4 prompts are code though code has 5 samples"
    fresh = PromptPlan(cfg.model_copy(update={"fresh_prompts": True}), [], seed=0)
    drawn = [s["domain"] for step in range(10) for s in fresh.supply(step).take(8)]
    assert 0.6 < drawn.count("code") / len(drawn) < 0.9
    with pytest.raises(ValidationError, match="give a share for each domain"):
        Config(model="m", data=[DataConfig(**ECHO), code], mix={"math": 1})


def test_a_mix_domain_without_samples_is_one_clear_error():
    """A record's own `domain` wins over data.domain: a mix share with no samples behind it fails at once, named."""
    samples = [sample(f"m{i}") for i in range(4)]  # every record says math
    cfg = Config(model="m", data=[DataConfig(**ECHO), DataConfig(**{**ECHO, "domain": "short"})],
                 mix={"math": 1, "short": 1}, prompts_per_step=2, steps=2)
    with pytest.raises(UserError, match="mix: domain 'short' has no training samples"):
        PromptPlan(cfg, samples, seed=0)


def test_a_mixed_step_says_which_domains_its_update_comes_from():
    """Mixed GRPO, G = 2, batch-level std. A tied math group (both right) teaches nothing. The other math
    group and the code group score 0 and 1: centred -+0.5, over the std 0.5774 of the rewards that train
    (0, 1, 0, 1), advantages -+0.866. Weights |A| x tokens: math 0.866 x (4 + 6), code 0.866 x (3 + 5),
    so math has 10/18 of the update and code 8/18."""
    code = DataConfig(domain="code", source="generator", task="experts.tasks:code_samples", size=20, heldout=5)
    cfg = Config(model="m", data=[DataConfig(**ECHO), code], mix={"math": 2, "code": 1}, prompts_per_step=3,
                 rollout=RolloutConfig(group_size=2), scale_rewards="batch")
    tied, m, c = sample("tied"), sample("m"), sample("c", "code")
    rollouts = [rollout(tied, tokens=9), rollout(tied, tokens=9), rollout(m, tokens=4), rollout(m, tokens=6),
                rollout(c, tokens=3), rollout(c, tokens=5)]
    keep, adv, metrics = score_and_advantages(rollouts, [RewardResult(r) for r in (1, 1, 0, 1, 0, 1)], cfg)
    assert keep == [2, 3, 4, 5] and adv == pytest.approx([-0.866, 0.866] * 2, abs=1e-3)
    assert (metrics["domain/math/groups_informative"], metrics["domain/code/groups_informative"]) == (1, 1)
    assert metrics["domain/math/update_share"] == pytest.approx(10 / 18)
    assert metrics["domain/code/update_share"] == pytest.approx(8 / 18)
    assert (metrics["domain/math/rollouts"], metrics["domain/code/length_mean"]) == (4, 4)


def test_domain_quotas_refill_and_train_each_domain_only_up_to_its_share():
    """prompts_per_step 4, mix 1:1, G = 2. The step's own prompts: math m0 (tied), m1 (informative), code c0, c1
    (both informative): quotas math 2, code 2, math is one short. Without quotas the refill draws the supply's
    next prompts whatever their domain; with them it draws math only (m2 and m3, passing c2 and c3 over), and
    code's surplus informative groups never train. One refill call each."""
    tied, mixed = [1, 1], [0, 1]
    own = [sample("m0", rewards=tied), sample("m1", rewards=mixed), sample("c0", "code", rewards=mixed),
           sample("c1", "code", rewards=mixed)]
    rest = [sample("c2", "code", rewards=mixed), sample("m2", rewards=mixed), sample("c3", "code", rewards=mixed),
            sample("m3", rewards=mixed)]
    code = DataConfig(domain="code", source="generator", task="experts.tasks:code_samples", size=20, heldout=5)

    def step(quotas: bool):
        cfg = Config(model="m", data=[DataConfig(**ECHO), code], mix={"math": 1, "code": 1}, prompts_per_step=4,
                     rollout=RolloutConfig(group_size=2), max_refill_calls=1, domain_quotas=quotas)
        rollouts, results, m = rollout_groups(cfg, StepPrompts(iter(own + rest), lambda s: False).take,
                                              fake_generate([]), fake_score, {})
        keep, _, more = score_and_advantages(rollouts, results, cfg)
        drawn = [r.sample["id"] for r in rollouts[8::2]]
        return drawn, sorted({rollouts[i].sample["id"] for i in keep}), m, more

    # Without: 3 of 4 informative, so the refill asks for ceil(1 / (3/4)) = 2 prompts, the next two of any domain.
    drawn, trained, m, more = step(False)
    assert drawn == ["c2", "m2"] and trained == ["c0", "c1", "c2", "m1"] and m["refill/groups_drawn"] == 2
    # With: math has 1 of its 2 (share 1/2), so ceil(1 / (1/2)) = 2 math prompts; c2 and c3 are passed over.
    drawn, trained, m, more = step(True)
    assert drawn == ["m2", "m3"] and trained == ["c0", "c1", "m1", "m2"] and m["refill/groups_drawn"] == 2
    assert more["domain/math/groups_informative"] == 2 and more["domain/code/groups_informative"] == 2


def test_a_step_supply_keeps_the_prompts_a_domain_take_passed_over():
    supply = StepPrompts(iter([sample("c0", "code"), sample("m0"), sample("c1", "code"), sample("m1")]), lambda s: False)
    assert [s["id"] for s in supply.take(2, "math")] == ["m0", "m1"]
    assert [s["id"] for s in supply.take(3)] == ["c0", "c1"]


def test_domain_quotas_need_a_mix():
    with pytest.raises(ValidationError, match="domain_quotas: true needs `mix`"):
        Config(model="m", domain_quotas=True)
