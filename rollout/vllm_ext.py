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
        return len(weights)
