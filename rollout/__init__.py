"""The one rollout: sampling for GRPO, OPD and eval, on Hugging Face `generate` or vLLM.

    config.py    RolloutConfig (how to sample) and AgentConfig (episode limits)
    types.py     Completion (one backend call's answer), Turn, Rollout (what trainers read)
    backends.py  the backend interface; HFBackend and VLLMBackend
    vllm_ext.py  the worker extension vLLM loads into its engine process (weight sync)
    turns.py     prompt rendering and one assistant turn under a reasoning mode's think budget
    episodes.py  multi-turn agent episodes in sandbox sessions
    worker.py    RolloutWorker: samples in, Rollouts out (the Ray actor's plain class)
    sync.py      learner group -> rollout workers, layer by layer, then a probe proves it

Modules import in that order only (no cycles). Nothing imports vLLM until a vllm backend starts.
"""
