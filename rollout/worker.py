"""`RolloutWorker`: samples in, `Rollout`s out, on one backend; the Ray actor's plain class.

GRPO, OPD and eval all sample through it: single-turn prompts as G completions each, agent prompts
(domain `agent`) as G sandbox episodes each. Weights arrive in buckets (`load_bucket`, then
`finish_sync`) from `rollout.sync`, which proves them with `prompt_logprobs`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from experts.models import load_tokenizer
from experts.train import set_threads
from rollout.backends import Backend, make_backend
from rollout.config import AgentConfig, RolloutConfig
from rollout.turns import complete_turns, render_prompt
from rollout.types import Rollout

log = logging.getLogger(__name__)


def sample(backend: Backend, tokenizer, samples: list[dict], cfg: RolloutConfig, first_group: int = 0) -> list[Rollout]:
    """`cfg.group_size` single-turn completions per sample, grouped: rollouts [g*G, (g+1)*G) answer samples[g]."""
    G = cfg.group_size
    prompts = [render_prompt(tokenizer, s["messages"], enable_thinking=cfg.thinking()) for s in samples]
    contexts = [p for p in prompts for _ in range(G)]
    turns = complete_turns(backend, tokenizer, contexts, [cfg.max_new_tokens] * len(contexts), cfg)
    return [Rollout(samples[k // G], first_group + k // G, contexts[k], t.ids, t.mask,
                    [lp * m for lp, m in zip(t.logprobs, t.mask)], tokenizer.decode(t.ids, skip_special_tokens=True),
                    t.finished) for k, t in enumerate(turns)]


class RolloutWorker:
    """Samples G responses per prompt; agent-domain prompts run as sandbox episodes."""

    def __init__(self, model_path: str, cfg: RolloutConfig, agent: AgentConfig | None = None, seed: int = 0):
        set_threads(cfg.threads)
        self.cfg, self.agent, self.seed = cfg, agent or AgentConfig(), seed
        self.tokenizer = load_tokenizer(model_path)
        self.backend = make_backend(model_path, cfg, seed)
        self._pool, self._owns_pool = None, False  # sandbox pool, found or started on the first agent prompt

    def generate(self, samples: list[dict], first_group: int = 0, step: int = 0, episodes: bool = True) -> list[Rollout]:
        """G rollouts per sample, grouped: rollouts [g*G, (g+1)*G) answer samples[g].

        Agent prompts run as sandbox episodes; `episodes=False` samples only their first turn. Each domain
        named in `cfg.domains` is sampled with its own limits (`RolloutConfig.for_domain`).
        """
        torch.manual_seed(self.seed * 1_000_003 + step * 7919 + first_group)  # reproducible, resumable sampling
        # one generate call per (kind, limits) part: single-turn prompts, agent episodes, each domain's own limits
        parts: dict[tuple[bool, str | None], list[int]] = {}
        for g, s in enumerate(samples):
            domain = s.get("domain")
            key = (episodes and domain == "agent", domain if domain in self.cfg.domains else None)
            parts.setdefault(key, []).append(g)
        out: list[Rollout] = []
        order: list[int] = []
        for (agent, domain), groups in sorted(parts.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            cfg = self.cfg.for_domain(domain)
            part = [samples[g] for g in groups]
            if agent:
                from rollout.episodes import run_episodes

                out += run_episodes(self.backend, self.tokenizer, part, 0, cfg, self.agent, self.sandbox_pool())
            else:
                out += sample(self.backend, self.tokenizer, part, cfg)
            order += groups
        G = self.cfg.group_size
        for k, r in enumerate(out):  # back to the caller's numbering: group g answers samples[g]
            r.group = first_group + order[k // G]
        return sorted(out, key=lambda r: r.group)

    def sandbox_pool(self):
        """This node's sandbox service, else (no `sandbox:` block) a private pool of `agent.sandboxes`."""
        if self._pool is None:
            from sandbox.service import node_pool

            self._pool, self._owns_pool = node_pool(self.agent.sandboxes)
        return self._pool

    def load_bucket(self, weights: dict[str, torch.Tensor] | Any) -> int:
        """Some of the policy's weights (HF names, whole layers); how many tensors."""
        self.backend.load_bucket(weights)
        return len(weights)

    def finish_sync(self) -> None:
        self.backend.finish_sync()

    def prompt_logprobs(self, rows: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs (temperature 1) of each row's tokens 1..n, to check a weight sync."""
        return self.backend.prompt_logprobs(rows)

    def sync_tolerance(self) -> float:
        return self.cfg.sync_tolerance or self.backend.default_tolerance

    def close(self) -> None:
        if self._pool is not None and self._owns_pool:
            self._pool.close()
        self._pool = None
        if hasattr(self.backend, "close"):
            self.backend.close()


# -- a fleet of workers: Ray actors, or one local worker in this process (tests) ------------------

def start_workers(model_path: str, cfg: RolloutConfig, agent: AgentConfig | None = None, seed: int = 0,
                  local: bool = False) -> list:
    """`cfg.num_workers` rollout workers as Ray actors (worker i seeded `seed + i`); `local`: one, in this process."""
    if local:
        return [RolloutWorker(model_path, cfg, agent, seed)]
    import ray

    actor = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                       scheduling_strategy="SPREAD" if cfg.placement == "spread" else "DEFAULT")(RolloutWorker)
    workers = [actor.remote(model_path, cfg, agent, seed + i) for i in range(cfg.num_workers)]
    try:
        ray.get([w.sync_tolerance.remote() for w in workers])  # each engine is up, or says why not
    except ray.exceptions.RayActorError as e:
        stop_workers(workers, close=False)
        raise _start_error(str(e)) from None
    return workers


def _start_error(message: str) -> Exception:
    """The one-line error a rollout actor's constructor raised (Ray keeps only its text)."""
    from pipeline.config import StageFailed, UserError

    for cls in (UserError, StageFailed):
        mark = f"{cls.__name__}: "
        lines = [ln for ln in message.splitlines() if mark in ln]
        if lines:
            return cls(lines[-1].split(mark, 1)[1].strip())
    return StageFailed(f"a rollout worker failed to start: {message.strip().splitlines()[-1]}")


def call(workers: list, method: str, *args, per_worker: list[tuple] | None = None) -> list:
    """`method` on every worker (Ray actors in parallel); the results in worker order."""
    import ray

    argv = per_worker or [args] * len(workers)
    if all(isinstance(w, ray.actor.ActorHandle) for w in workers):
        return ray.get([getattr(w, method).remote(*a) for w, a in zip(workers, argv)])
    return [getattr(w, method)(*a) for w, a in zip(workers, argv)]


def generate_on(workers: list, samples: list[dict], step: int = 0, episodes: bool = True) -> list[Rollout]:
    """Split `samples` over the workers, G rollouts each; back in one list, grouped in sample order."""
    shards = [samples[i :: len(workers)] for i in range(len(workers))]
    firsts = [sum(len(s) for s in shards[:i]) for i in range(len(workers))]
    busy = [i for i, s in enumerate(shards) if s]
    parts = call([workers[i] for i in busy], "generate", per_worker=[(shards[i], firsts[i], step, episodes) for i in busy])
    return [r for part in parts for r in part]


def stop_workers(workers: list, close: bool = True) -> None:
    """Close every worker (sandbox pools, engines), then end the actors."""
    import ray

    try:
        if close:
            call(workers, "close")
    finally:
        for w in workers:
            if isinstance(w, ray.actor.ActorHandle):
                ray.kill(w)
