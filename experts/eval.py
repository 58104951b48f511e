"""Stage `eval`: score checkpoints on a held-out split with a named metric; writes `eval.json`."""

from __future__ import annotations

import logging
from typing import Literal

import ray
from pydantic import Field, model_validator

from experts.agent_rollout import AgentConfig
from experts.data import DataConfig, load_samples
from experts.generate import generate
from experts.models import load_model, load_tokenizer
from experts.train import pick_device, set_threads
from pipeline.config import MAX_TOKENS, BatchSize, ModelRef, StageConfig, Tokens
from pipeline.context import StageContext, atomic_write_json

log = logging.getLogger(__name__)


class Config(StageConfig):
    models: list[ModelRef] = Field(description="Checkpoints to compare: stage names or local HF checkpoint dirs.")
    data: list[DataConfig] = Field(default_factory=lambda: [DataConfig()], description="Domains to score, held-out split of each.")
    metric: Literal["auto", "exact_match", "math", "instruction", "code"] = Field(
        "auto",
        description="exact_match: the final answer is the gold string; math: equal by math-verify; instruction, "
        "code: that reward's score; auto: the reward named like the domain, else exact_match. Domain agent "
        "is always scored by greedy episodes in the sandbox, 1 when the task's check passes.",
    )
    limit: int | None = Field(None, ge=1, description="Score at most this many held-out samples per domain.")
    max_new_tokens: Tokens = Field(48, description="Generation budget per sample (at most 2^20 tokens).")
    batch_size: BatchSize = Field(64, description="Prompts per generate call (at most 65,536).")
    enable_thinking: bool = Field(True, description="False pre-fills an empty think block (non-think mode).")
    threads: int = Field(0, ge=0, le=4096, description="CPU threads per evaluation task (0: all cores).")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="Episode limits for domain agent (needs Docker).")

    @model_validator(mode="after")
    def _agent_fits(self):
        if self.agent.max_total_tokens > MAX_TOKENS:
            raise ValueError(f"agent.max_total_tokens is {self.agent.max_total_tokens}; at most {MAX_TOKENS}")
        return self


def metric_for(metric: str, domain: str) -> str:
    if domain == "agent":
        return "agent"
    if metric != "auto":
        return metric
    return domain if domain in ("math", "instruction", "code") else "exact_match"


def score_completions(metric: str, samples: list[dict], completions: list[str]) -> list[float]:
    """Per-sample scores from the rewards' own checkers, so evaluation and GRPO agree on what is right."""
    from rewards import make_reward
    from rewards.math_answer import extract_answer

    if metric == "exact_match":
        return [float((extract_answer(c) or "").strip() == s["answer"].strip()) for s, c in zip(samples, completions)]
    reward = make_reward(metric)
    try:
        return [r.score for r in reward([{**s, "completion": c} for s, c in zip(samples, completions)])]
    finally:
        if hasattr(reward, "close"):  # the code reward's sandbox pool: gone before this Ray worker is reused
            reward.close()


def score_episodes(model_path: str, samples: list[dict], cfg: Config) -> dict:
    """One greedy episode per agent task in a sandbox session; the task's check decides 0 or 1."""
    from experts.rollout import RolloutConfig, RolloutWorker

    rollout = RolloutConfig(max_new_tokens=cfg.max_new_tokens, threads=cfg.threads,
                            reasoning="think_max" if cfg.enable_thinking else "non_think")
    # One greedy episode per task: past the config's sampling bounds on purpose, so no validation.
    worker = RolloutWorker(model_path, rollout.model_copy(update={"group_size": 1, "temperature": 0.0}), cfg.agent)
    try:
        episodes = [r.episode for r in worker.generate(samples)]
    finally:
        worker.close()
    examples = [{"prompt": s["messages"][-1]["content"], "answer": s["answer"], "completion": e["messages"][len(s["messages"]):]}
                for s, e in list(zip(samples, episodes))[:3]]
    return {"score": sum(e["reward"] for e in episodes) / len(episodes), "n": len(episodes), "examples": examples}


def score_model(model_path: str, samples: list[dict], cfg: Config) -> dict:
    """Generate greedily for `samples` and score each; returns the mean and a few examples."""
    set_threads(cfg.threads)
    if samples[0]["domain"] == "agent":
        return score_episodes(model_path, samples, cfg)
    tok, model = load_tokenizer(model_path), load_model(model_path).to(pick_device())
    gens = generate(model, tok, [s["messages"] for s in samples], cfg.max_new_tokens,
                    batch_size=cfg.batch_size, enable_thinking=cfg.enable_thinking)
    hits = score_completions(metric_for(cfg.metric, samples[0]["domain"]), samples, [g.text for g in gens])
    examples = [{"prompt": s["messages"][-1]["content"], "answer": s["answer"], "completion": g.text}
                for g, s in list(zip(gens, samples))[:3]]
    return {"score": sum(hits) / len(hits), "n": len(hits), "examples": examples}


def run(cfg: Config, ctx: StageContext) -> None:
    score = ray.remote(num_cpus=1)(score_model)
    results: dict[str, dict[str, dict]] = {}
    for data in cfg.data:
        samples = load_samples(data, "heldout")[: cfg.limit]
        futures = {ref: score.remote(str(ctx.model_path(ref)), samples, cfg) for ref in cfg.models}
        results[data.domain] = {ref: ray.get(f) for ref, f in futures.items()}
        for ref, r in results[data.domain].items():
            log.info("%s %s on %s: %.3f (n=%d)", metric_for(cfg.metric, data.domain), ref, data.domain, r["score"], r["n"])
    table = {dom: {ref: r["score"] for ref, r in by_model.items()} for dom, by_model in results.items()}
    metrics = {d.domain: metric_for(cfg.metric, d.domain) for d in cfg.data}
    atomic_write_json(ctx.out_dir / "eval.json", {"metric": metrics, "scores": table, "details": results})
    ctx.log_metrics(0, {f"score/{dom}/{ref}": s for dom, row in table.items() for ref, s in row.items()})
    log.info("%s: mean score per domain (%s)\n%s", ctx.name, ", ".join(f"{d}: {m}" for d, m in metrics.items()),
             format_table(table))


def format_table(table: dict[str, dict[str, float]]) -> str:
    """Scores as a text table: one row per model, one column per domain.

    >>> print(format_table({"math": {"base": 0.0, "sft": 0.5}, "code": {"base": 0.1, "sft": 0.25}}))
    model   math   code
    base   0.000  0.100
    sft    0.500  0.250
    """
    domains = list(table)
    models = list(next(iter(table.values())))
    name = max(5, *(len(m) for m in models))
    widths = [max(5, len(d)) for d in domains]
    lines = [f"{'model':<{name}}" + "".join(f"  {d:>{w}}" for d, w in zip(domains, widths))]
    for m in models:
        lines.append(f"{m:<{name}}" + "".join(f"  {table[d][m]:>{w}.3f}" for d, w in zip(domains, widths)))
    return "\n".join(lines)
