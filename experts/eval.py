"""Stage `eval`: score checkpoints on a held-out split with a named metric, and on lm-eval-harness benchmarks
(`lm_eval`); writes `eval.json`."""

from __future__ import annotations

import logging
from typing import Literal

import ray
from pydantic import Field, model_validator
from tqdm import tqdm

from typing import Any

from experts.benchmarks import LmEvalConfig, run_benchmarks
from experts.data import DataConfig, load_samples
from pipeline.config import MAX_TOKENS, BatchSize, ModelRef, StageConfig, Tokens
from pipeline.context import StageContext, atomic_write_json
from rollout.config import AgentConfig, Backend, DomainRollout, RolloutConfig

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
    backend: Backend = Field("hf", description="Rollout engine that generates (greedy): hf or vllm (rollout.backend).")
    vllm: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for vllm.LLM (backend: vllm).")
    num_gpus: float = Field(0, ge=0, le=64, description="GPUs each evaluation task reserves (vllm on GPU: 1).")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="Episode limits for domain agent (needs Docker).")
    model_domains: dict[str, list[str]] = Field(default_factory=dict, description="Model -> the only domains it is "
                                                "scored on (e.g. an expert on its own); a model not named is scored "
                                                "on every domain.")
    relative: dict[str, dict[str, str]] = Field(default_factory=dict, description="Model -> {domain: reference "
                                                "model}: the eval reports the model's score as a share of the "
                                                "reference's, e.g. {opd: {math: grpo_math}} for what a distilled "
                                                "student keeps of each teacher.")
    domains: dict[str, DomainRollout] = Field(default_factory=dict, description="Per-domain generation limits, e.g. "
                                              "{math: {max_new_tokens: 32}} (rollout.domains, as the stages that "
                                              "trained the models sampled).")
    lm_eval: LmEvalConfig | None = Field(None, description="lm-eval-harness tasks to run on checkpoints, e.g. "
                                         "{tasks: [gsm8k], limit: 50}; each task's headline metric joins "
                                         "eval.json and the logged tables.")

    @model_validator(mode="after")
    def _agent_fits(self):
        if self.agent.max_total_tokens > MAX_TOKENS:
            raise ValueError(f"agent.max_total_tokens is {self.agent.max_total_tokens}; at most {MAX_TOKENS}")
        domains = [d.domain for d in self.data]
        for field, table in (("model_domains", {m: {d: None for d in ds} for m, ds in self.model_domains.items()}),
                             ("relative", self.relative)):
            for model, by_domain in table.items():
                if model not in self.models:
                    raise ValueError(f"{field}: {model!r} is not one of models ({', '.join(self.models)})")
                for d, ref in by_domain.items():
                    if d not in domains:
                        raise ValueError(f"{field}.{model}: {d!r} is not a domain of data ({', '.join(domains)})")
                    if ref is not None and ref not in self.models:
                        raise ValueError(f"{field}.{model}.{d}: {ref!r} is not one of models ({', '.join(self.models)})")
        for model, by_domain in self.relative.items():
            for d, ref in by_domain.items():
                for m in (model, ref):
                    if d not in self.scored_domains(m, domains):
                        raise ValueError(f"relative.{model}.{d}: {m!r} is not scored on {d!r} (model_domains)")
        return self

    def scored_domains(self, model: str, domains: list[str]) -> list[str]:
        return [d for d in domains if model not in self.model_domains or d in self.model_domains[model]]

    def benchmark_models(self) -> list[str]:
        """The checkpoints lm-eval runs on: its own `models`, else the stage's."""
        if self.lm_eval is None:
            return []
        return list(self.lm_eval.models) if self.lm_eval.models is not None else list(self.models)


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


def greedy_rollout(cfg: Config, agent: bool) -> RolloutConfig:
    """One greedy completion per sample on the configured engine; agent episodes think until the answer reserve
    (each domain's `domains` limits apply on top)."""
    reasoning = ("think_max" if agent else "think") if cfg.enable_thinking else "non_think"
    return RolloutConfig(backend=cfg.backend, vllm=cfg.vllm, group_size=1, temperature=0.0, reasoning=reasoning,
                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, threads=cfg.threads,
                         domains=cfg.domains)


def score_model(model_path: str, samples: list[dict], cfg: Config) -> dict:
    """Generate greedily for `samples` (agent tasks: one episode each) and score each; the mean and a few examples."""
    from rollout.worker import RolloutWorker

    agent = samples[0]["domain"] == "agent"
    worker = RolloutWorker(model_path, greedy_rollout(cfg, agent), cfg.agent)
    try:
        rollouts = worker.generate(samples)
    finally:
        worker.close()
    if agent:
        hits = [r.episode["reward"] for r in rollouts]
        examples = [{"prompt": s["messages"][-1]["content"], "answer": s["answer"],
                     "completion": r.episode["messages"][len(s["messages"]):]} for s, r in list(zip(samples, rollouts))[:3]]
    else:
        hits = score_completions(metric_for(cfg.metric, samples[0]["domain"]), samples, [r.text for r in rollouts])
        examples = [{"prompt": s["messages"][-1]["content"], "answer": s["answer"], "completion": r.text}
                    for r, s in list(zip(rollouts, samples))[:3]]
    return {"score": sum(hits) / len(hits), "n": len(hits), "examples": examples,
            "completions": [r.text for r in rollouts]}


def resources(cfg: Config) -> dict[str, float]:
    """What the stage needs to make progress: one scoring task (models are scored in tasks that queue)."""
    return {"CPU": 1.0, "GPU": cfg.num_gpus}


LM_EVAL = "lm_eval"  # the key of a model's benchmark task among the (domain, model) scoring tasks


def run(cfg: Config, ctx: StageContext) -> None:
    score = ray.remote(num_cpus=1, num_gpus=cfg.num_gpus)(score_model)
    bench = ray.remote(num_cpus=1, num_gpus=cfg.num_gpus)(run_benchmarks)
    domains = [d.domain for d in cfg.data]
    pending: dict[ray.ObjectRef, tuple[str, str]] = {}
    for data in cfg.data:  # every (domain, model) task at once, so no core waits for a domain's slowest model
        samples = load_samples(data, "heldout")[: cfg.limit]
        pending.update({score.remote(str(ctx.model_path(ref)), samples, cfg): (data.domain, ref) for ref in cfg.models
                        if data.domain in cfg.scored_domains(ref, domains)})
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    pending.update({bench.remote(str(ctx.model_path(ref)), cfg.lm_eval, cfg.threads, device): (LM_EVAL, ref)
                    for ref in cfg.benchmark_models()})
    done = gather(pending, cfg, ctx.name)
    results: dict[str, dict[str, dict]] = {}
    for (domain, ref), r in done.items():  # in submission order: domains as configured, models as listed
        if domain != LM_EVAL:
            results.setdefault(domain, {})[ref] = r
    table = {dom: {ref: r["score"] for ref, r in by_model.items()} for dom, by_model in results.items()}
    shares = relative_scores(table, cfg.relative)
    metrics = {d.domain: metric_for(cfg.metric, d.domain) for d in cfg.data}
    benchmarks = benchmark_report({ref: r for (key, ref), r in done.items() if key == LM_EVAL})
    atomic_write_json(ctx.out_dir / "eval.json", {"metric": metrics, "scores": table, "relative": shares,
                                                  "details": results, **({LM_EVAL: benchmarks} if cfg.lm_eval else {})})
    ctx.log_metrics(0, {**{f"score/{dom}/{ref}": s for dom, row in table.items() for ref, s in row.items()},
                        **{f"relative/{m}/{dom}": r["share"] for m, row in shares.items() for dom, r in row.items()
                           if r["share"] is not None},
                        **{f"lm_eval/{task}/{ref}": s for task, row in benchmarks.get("scores", {}).items()
                           for ref, s in row.items()}})
    if table:
        log.info("%s: mean score per domain (%s)\n%s", ctx.name, ", ".join(f"{d}: {m}" for d, m in metrics.items()),
                 format_table(table, cfg.models) + format_relative(shares))
    if benchmarks.get("scores"):
        log.info("%s: lm-eval, headline metric per task (%s)\n%s", ctx.name,
                 ", ".join(f"{t}: {m.removesuffix(',none')}" for t, m in benchmarks["metric"].items()),
                 format_table(benchmarks["scores"], cfg.benchmark_models()))


def gather(pending: dict[ray.ObjectRef, tuple[str, str]], cfg: Config, desc: str) -> dict[tuple[str, str], dict]:
    """Each scoring task's result, logged as it finishes under a progress bar; keyed (domain or "lm_eval",
    model) in submission order."""
    done: dict[ray.ObjectRef, dict] = {}
    left = list(pending)
    with tqdm(total=len(left), desc=desc, unit="task", mininterval=2.0) as bar:
        while left:
            ready, left = ray.wait(left, num_returns=1)
            (key, ref), r = pending[ready[0]], ray.get(ready[0])
            done[ready[0]] = r
            if key == LM_EVAL:
                log.info("lm-eval on %s: %s", ref, ", ".join(f"{t} {s['metric'].removesuffix(',none')} "
                                                             f"{s['score']:.3f} (n={s['n']})"
                                                             for t, s in r["scores"].items()))
            else:
                log.info("%s %s on %s: %.3f (n=%d)", metric_for(cfg.metric, key), ref, key, r["score"], r["n"])
            bar.update()
    return {pending[f]: done[f] for f in pending}


def benchmark_report(by_model: dict[str, dict]) -> dict[str, Any]:
    """The lm-eval part of eval.json: each task's headline metric, its score and sample count per model, and
    every metric lm-eval reported (stderr included) per model.

    >>> benchmark_report({"base": {"scores": {"toy": {"metric": "acc,none", "score": 0.5, "n": 4}},
    ...                            "metrics": {"toy": {"acc,none": 0.5}}}})["scores"]
    {'toy': {'base': 0.5}}
    """
    if not by_model:
        return {}
    report: dict[str, Any] = {"metric": {}, "scores": {}, "n": {}, "details": {}}
    for ref, r in by_model.items():
        for task, s in r["scores"].items():
            report["metric"][task] = s["metric"]
            report["scores"].setdefault(task, {})[ref] = s["score"]
            report["n"].setdefault(task, {})[ref] = s["n"]
        report["details"][ref] = r["metrics"]
    return report


def relative_scores(table: dict[str, dict[str, float]], relative: dict[str, dict[str, str]]) -> dict[str, dict]:
    """Each `relative` model's score per domain as a share of its reference's (None where the reference
    scores 0: no share of nothing is meaningful).

    >>> relative_scores({"math": {"t": 0.8, "s": 0.76}}, {"s": {"math": "t"}})
    {'s': {'math': {'reference': 't', 'score': 0.76, 'reference_score': 0.8, 'share': 0.95}}}
    """
    out: dict[str, dict] = {}
    for model, by_domain in relative.items():
        for d, ref in by_domain.items():
            s, r = table[d][model], table[d][ref]
            out.setdefault(model, {})[d] = {"reference": ref, "score": s, "reference_score": r,
                                            "share": round(s / r, 4) if r > 0 else None}
    return out


def format_relative(shares: dict[str, dict]) -> str:
    """One line per (model, domain) of `relative_scores`, after the table.

    >>> print(format_relative(relative_scores({"math": {"t": 0.8, "s": 0.76}, "code": {"t": 0.0, "s": 0.5}},
    ...                                       {"s": {"math": "t", "code": "t"}})))
    <BLANKLINE>
    s on math: 0.760 = 95.0% of t (0.800)
    s on code: 0.500, t scores 0
    """
    return "".join(f"\n{m} on {d}: {r['score']:.3f} = {100 * r['share']:.1f}% of {r['reference']} "
                   f"({r['reference_score']:.3f})" if r["share"] is not None else
                   f"\n{m} on {d}: {r['score']:.3f}, {r['reference']} scores 0"
                   for m, row in shares.items() for d, r in row.items())


def format_table(table: dict[str, dict[str, float]], models: list[str] | None = None) -> str:
    """Scores as a text table: one row per model, one column per domain ("-": not scored there), and the
    mean over domains for models scored on all of them.

    >>> print(format_table({"math": {"base": 0.0, "sft": 0.5}, "code": {"base": 0.1}}))
    model   math   code   mean
    base   0.000  0.100  0.050
    sft    0.500      -      -
    """
    domains = list(table)
    models = models or list(dict.fromkeys(m for row in table.values() for m in row))
    name = max(5, *(len(m) for m in models))
    cols = domains + ["mean"] if len(domains) > 1 else domains
    widths = [max(5, len(d)) for d in cols]
    lines = [f"{'model':<{name}}" + "".join(f"  {d:>{w}}" for d, w in zip(cols, widths))]
    for m in models:
        row = [table[d].get(m) for d in domains]
        if len(cols) > len(domains):
            row.append(sum(row) / len(row) if None not in row else None)
        lines.append(f"{m:<{name}}" + "".join(f"  {v:>{w}.3f}" if v is not None else f"  {'-':>{w}}"
                                              for v, w in zip(row, widths)))
    return "\n".join(lines)
