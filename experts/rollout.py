"""Rollout workers: sample G responses per prompt with per-token log-probs, on HF `generate` or vLLM.

`RolloutWorker` is a plain class (tests call it directly); the GRPO stage wraps it in a Ray actor.
It owns one backend behind a three-method interface (`complete`, `load_weights`, `prompt_logprobs`):

- `HFBackend` (default, CPU, tested): `experts.generate.generate_tokens` on a copy of the model.
- `VLLMBackend` (`backend: vllm`, the `gpu` extra): vLLM's offline engine, weights pushed into it
  after each update. UNTESTED here (no GPU in CI); written against vLLM >= 0.10's `LLM` API.

Reasoning modes (DeepSeek-V4's three): `non_think` pre-fills an empty think block; `think_high`
thinks for at most `think_budget` tokens; `think_max` may think until `answer_reserve` tokens
before `max_new_tokens`. A budget is enforced by generating up to it with `</think>` as a stop
token, then, for rows still thinking, appending `</think>\\n` (masked out of the loss: the model did
not sample it) and generating the answer. Two calls, no logits-processor, so both backends share it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import Field

from experts.generate import TokenCompletion, generate_tokens, render_prompt
from experts.models import THINK_CLOSE, THINK_OPEN, load_model, load_tokenizer
from experts.train import pick_device, set_threads
from pipeline.config import StageConfig

log = logging.getLogger(__name__)


class RolloutConfig(StageConfig):
    """How responses are sampled."""

    backend: Literal["hf", "vllm"] = Field("hf", description="hf: transformers generate (CPU or GPU); vllm: the vLLM engine (GPU, `gpu` extra).")
    group_size: int = Field(8, ge=2, description="G: responses sampled per prompt; advantages are relative to the group.")
    max_new_tokens: int = Field(64, ge=1, description="Longest response in tokens (per turn for agent episodes).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; the learner's log-probs use the same one.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; below 1 the sampler departs from the policy, so keep 1 for exact ratios.")
    reasoning: Literal["non_think", "think_high", "think_max"] = Field(
        "think_high", description="non_think: empty think block pre-filled; think_high: think up to think_budget tokens; think_max: think until answer_reserve tokens are left.")
    think_budget: int = Field(48, ge=1, description="think_high: tokens allowed in <think> before </think> is forced.")
    answer_reserve: int = Field(16, ge=1, description="think_max: tokens kept for the answer after thinking.")
    batch_size: int = Field(64, ge=1, description="Sequences per generate call (hf backend).")
    num_workers: int = Field(1, ge=1, description="Rollout actors; prompts are split between them.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs each rollout actor reserves in Ray (phases run one at a time, so actors may share cores).")
    num_gpus: float = Field(0, ge=0, description="GPUs each rollout actor reserves (vllm: 1).")
    threads: int = Field(0, ge=0, description="CPU threads per rollout actor (0: all cores).")
    sync_tolerance: float | None = Field(
        None, gt=0, description="Max mean |rollout - learner| log-prob on the probe batch after a weight sync; None: 1e-4 for hf (same fp32 math), 2e-2 for vllm (bf16, other kernels).")
    vllm: dict[str, Any] = Field(default_factory=lambda: {"gpu_memory_utilization": 0.4, "dtype": "bfloat16"},
                                 description="Extra keyword arguments for vllm.LLM (backend: vllm).")

    def budget(self) -> int | None:
        """Think tokens allowed before `</think>` is forced, or None for no separate budget."""
        if self.reasoning == "think_high":
            return self.think_budget
        if self.reasoning == "think_max":
            return max(1, self.max_new_tokens - self.answer_reserve)
        return None

    def tolerance(self) -> float:
        return self.sync_tolerance or (1e-4 if self.backend == "hf" else 2e-2)


@dataclass
class Rollout:
    """One sampled response (or agent episode) for one prompt, ready to score and train on."""

    sample: dict  # the prompt's sample: {id, domain, messages, answer, meta}
    group: int  # which prompt of this step's batch it answers; its G siblings share the number
    prompt_ids: list[int]
    response_ids: list[int]  # everything after the prompt: sampled, forced and tool-result tokens
    loss_mask: list[int]  # 1 where the model sampled the token; 0 on forced and tool-result tokens
    logprobs: list[float]  # the rollout engine's log pi for each response token (0.0 where masked)
    text: str  # what the rewards read: the (last) assistant message, markup kept
    finished: bool  # ended with end-of-turn rather than a token limit
    turns: int = 1
    episode: dict | None = None  # agent episodes: {reward, turns, messages, check} for rewards.agent
    extra: dict = field(default_factory=dict)

    def reward_sample(self) -> dict:
        """The sample dict a reward scores (rewards' one interface)."""
        meta = dict(self.sample.get("meta") or {})
        if self.episode is not None:
            meta["episode"] = self.episode
        return {**self.sample, "completion": self.text, "meta": meta}


class Backend(Protocol):
    def complete(self, prompts: list[list[int]], max_new_tokens: list[int], stop_ids: list[int],
                 temperature: float, top_p: float) -> list[TokenCompletion]: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...

    def prompt_logprobs(self, rows: list[list[int]], temperature: float) -> list[list[float]]: ...


class HFBackend:
    """Transformers `generate` on the worker's own copy of the model."""

    def __init__(self, model_path: str, cfg: RolloutConfig):
        self.cfg = cfg
        self.model = load_model(model_path).to(pick_device()).eval()
        self.pad_id = load_tokenizer(model_path).pad_token_id

    def complete(self, prompts, max_new_tokens, stop_ids, temperature, top_p):
        # One call for the longest limit, then rows with a smaller one are cut (and marked unfinished).
        outs = generate_tokens(self.model, prompts, max(max_new_tokens), stop_ids, self.pad_id,
                               temperature, top_p, self.cfg.batch_size)
        for o, n in zip(outs, max_new_tokens):
            if len(o.ids) > n:
                o.ids, o.logprobs, o.stopped = o.ids[:n], o.logprobs[:n], False
        return outs

    def load_weights(self, state_dict):
        self.model.load_state_dict(state_dict)

    @torch.no_grad()
    def prompt_logprobs(self, rows, temperature):
        from experts.grpo_loss import token_logprobs

        out = []
        for r in rows:
            ids = torch.tensor([r], device=next(self.model.parameters()).device)
            out.append(token_logprobs(self.model(input_ids=ids).logits[:, :-1], ids[:, 1:], temperature)[0].tolist())
        return out


class VLLMBackend:
    """vLLM's offline engine. UNTESTED in this repository (no GPU in CI); kept behind the same interface."""

    def __init__(self, model_path: str, cfg: RolloutConfig):
        try:
            from vllm import LLM
        except ImportError as e:  # lazy: tests and CPU runs never import vllm
            raise RuntimeError("backend: vllm needs the `gpu` extra (pip install -e '.[gpu]')") from e
        # processed_logprobs: log-probs after temperature, what the learner computes.
        self.llm = LLM(model=model_path, enable_prefix_caching=True, logprobs_mode="processed_logprobs", **cfg.vllm)

    def complete(self, prompts, max_new_tokens, stop_ids, temperature, top_p):
        from vllm import SamplingParams

        params = [SamplingParams(n=1, max_tokens=n, temperature=temperature, top_p=top_p, stop_token_ids=list(stop_ids),
                                 logprobs=0, skip_special_tokens=False) for n in max_new_tokens]
        reqs = [{"prompt_token_ids": p} for p in prompts]
        outs = []
        for res in self.llm.generate(reqs, params, use_tqdm=False):
            c = res.outputs[0]
            lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
            outs.append(TokenCompletion(list(c.token_ids), lps, c.finish_reason == "stop"))
        return outs

    def load_weights(self, state_dict):
        # The model object moved between vLLM versions; try the known homes (same as TRL's colocate mode).
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        runner = getattr(getattr(worker, "worker", worker), "model_runner", None) or worker.model_runner
        runner.model.load_weights(state_dict.items())
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def prompt_logprobs(self, rows, temperature):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=temperature, prompt_logprobs=0)
        res = self.llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        return [[d[t].logprob for t, d in zip(r[1:], o.prompt_logprobs[1:])] for r, o in zip(rows, res)]


def make_backend(model_path: str, cfg: RolloutConfig) -> Backend:
    return VLLMBackend(model_path, cfg) if cfg.backend == "vllm" else HFBackend(model_path, cfg)


@dataclass
class Turn:
    """One assistant turn's tokens: `ids` with `mask` (0 on forced tokens) and rollout log-probs."""

    ids: list[int]
    mask: list[int]
    logprobs: list[float]
    finished: bool


def complete_turns(backend: Backend, tokenizer, contexts: list[list[int]], limits: list[int],
                   cfg: RolloutConfig) -> list[Turn]:
    """Generate one assistant turn after each context, enforcing the reasoning mode's think budget.

    contexts: token ids ending with the assistant header (and the pre-filled empty think block in
    non_think mode); limits: each turn's token limit. Returns one `Turn` per context.
    """
    eos = tokenizer.eos_token_id
    close = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    open_ = tokenizer.convert_tokens_to_ids(THINK_OPEN)
    budget = cfg.budget()
    if budget is None or budget >= max(limits):
        outs = backend.complete(contexts, limits, [eos], cfg.temperature, cfg.top_p)
        return [Turn(o.ids, [1] * len(o.ids), o.logprobs, o.stopped) for o in outs]

    first = backend.complete(contexts, [min(budget, n) for n in limits], [eos, close], cfg.temperature, cfg.top_p)
    turns = [Turn(o.ids, [1] * len(o.ids), o.logprobs, o.stopped and o.ids[-1] == eos) for o in first]
    forced = tokenizer(THINK_CLOSE + "\n", add_special_tokens=False)["input_ids"]
    again = []
    for i, (t, o) in enumerate(zip(turns, first)):
        if t.finished or len(t.ids) >= limits[i]:
            continue
        if not o.stopped and open_ in t.ids and close not in t.ids:  # budget spent mid-thought: close it
            t.ids, t.mask, t.logprobs = t.ids + forced, t.mask + [0] * len(forced), t.logprobs + [0.0] * len(forced)
        again.append(i)
    if again:
        rest = backend.complete([contexts[i] + turns[i].ids for i in again],
                                [max(1, limits[i] - len(turns[i].ids)) for i in again], [eos], cfg.temperature, cfg.top_p)
        for i, o in zip(again, rest):
            t = turns[i]
            t.ids, t.mask, t.logprobs, t.finished = t.ids + o.ids, t.mask + [1] * len(o.ids), t.logprobs + o.logprobs, o.stopped
    return turns


class RolloutWorker:
    """Samples G responses per prompt; agent-domain prompts run as sandbox episodes."""

    def __init__(self, model_path: str, cfg: RolloutConfig, agent: Any = None, seed: int = 0):
        set_threads(cfg.threads)
        self.cfg, self.agent, self.seed = cfg, agent, seed
        self.tokenizer = load_tokenizer(model_path)
        self.backend = make_backend(model_path, cfg)
        self._pool = None  # sandbox pool, started on the first agent prompt

    def generate(self, samples: list[dict], first_group: int = 0, step: int = 0) -> list[Rollout]:
        """G rollouts per sample, grouped: rollouts [g*G, (g+1)*G) answer samples[g]."""
        torch.manual_seed(self.seed * 1_000_003 + step * 7919 + first_group)  # reproducible, resumable sampling
        G = self.cfg.group_size
        if any(s.get("domain") == "agent" for s in samples):
            from experts.agent_rollout import run_episodes

            return run_episodes(self.backend, self.tokenizer, samples, first_group, self.cfg, self.agent, self.sandbox_pool())
        think = self.cfg.reasoning != "non_think"
        prompts = [render_prompt(self.tokenizer, s["messages"], enable_thinking=think) for s in samples]
        contexts = [p for p in prompts for _ in range(G)]
        turns = complete_turns(self.backend, self.tokenizer, contexts, [self.cfg.max_new_tokens] * len(contexts), self.cfg)
        out = []
        for k, t in enumerate(turns):
            g = k // G
            out.append(Rollout(samples[g], first_group + g, contexts[k], t.ids, t.mask,
                               [lp * m for lp, m in zip(t.logprobs, t.mask)],
                               self.tokenizer.decode(t.ids, skip_special_tokens=True), t.finished))
        return out

    def sandbox_pool(self):
        if self._pool is None:
            from sandbox import SandboxPool

            self._pool = SandboxPool(size=self.agent.sandboxes if self.agent else 2)
        return self._pool

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.backend.load_weights(state_dict)

    def prompt_logprobs(self, rows: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of each row's tokens 1..n, to check a weight sync."""
        return self.backend.prompt_logprobs(rows, self.cfg.temperature)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
