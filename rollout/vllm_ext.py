"""The worker extension vLLM mixes into its GPU/CPU worker (`LLM(worker_extension_cls=...)`).

vLLM's V1 engine runs the model in another process; `llm.collective_rpc(method, args)` calls a
method of this class there, on every worker of the engine. Weights arrive as safetensors bytes
(exact dtype and shape through vLLM's msgpack channel, which would turn raw tensors into lists) in
Hugging Face names, whole decoder layers per call: vLLM's in-place reload re-packs a layer's fused
and CPU-repacked kernels when the call ends, so a layer split over two calls would be finished half
loaded. Importing this module must stay cheap: it runs in the engine's worker processes.
"""

from __future__ import annotations


class WeightSync:
    def load_bucket(self, blob: bytes) -> int:
        """Reload the weights in one safetensors blob (HF names, whole layers); how many tensors."""
        from safetensors.torch import load

        weights = load(blob)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        self._refresh_tied_head(weights)
        return len(weights)

    def _refresh_tied_head(self, weights) -> None:
        """A tied LM head shares the embedding's Parameter but gets no weights of its own (the loader
        skips `lm_head.weight`), so the reload never re-processes it; on CPU its GEMM keeps a packed
        copy of the old embedding and the logits go stale. Re-process it whenever the embedding came."""
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embed = next((k for k in weights if k.endswith("embed_tokens.weight")), None)
        if embed is None or head is None or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            return
        method = getattr(head, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(head)
