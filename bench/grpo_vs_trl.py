"""GRPO step time and reward curve: ours against TRL's `GRPOTrainer`, same model, data and settings.

    python bench/grpo_vs_trl.py            # ~3 minutes on 2 CPU cores

Both start from the same tiny SFT model (trained here on the copy-the-digits task of
`experts.tasks`), see the same prompts in the same order, sample G=8 responses of at most 16
tokens at temperature 1, score them with the same checker (`rewards.math_answer.math_correct`),
use no KL term, one update per step, and the same learning rate. Ours runs its plain classes in
this process (the Ray actors wrap exactly these), so neither side pays for process hops.
Step time excludes the first step of each (warm-up). Ends with one line per headline figure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from experts.data import DataConfig, load_samples, sample_texts  # noqa: E402
from experts.grpo import Config, GRPOLearner, collate_rollouts, probe_rows, score_and_advantages  # noqa: E402
from experts.models import build_tiny_model, load_model, load_tokenizer, save_checkpoint, train_tokenizer  # noqa: E402
from experts.sft import Config as SFTConfig  # noqa: E402
from experts.sft import build_rows, optim, train_step  # noqa: E402
from learner.batching import batch_plan  # noqa: E402
from learner.group import WorkerGroup  # noqa: E402
from rewards import CombinedReward, RewardSpec  # noqa: E402
from rewards.math_answer import math_correct  # noqa: E402
from rollout.config import RolloutConfig  # noqa: E402
from rollout.sync import sync_weights  # noqa: E402
from rollout.worker import RolloutWorker  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


def make_sft(root: Path, data: DataConfig, steps: int) -> Path:
    tok = train_tokenizer(sample_texts(load_samples(data, "all")), vocab_size=300)
    save_checkpoint(build_tiny_model(tok, **TINY), tok, root / "base")
    torch.manual_seed(0)
    cfg = SFTConfig(model=str(root / "base"), steps=steps, batch_size=16, lr=3e-3, warmup_steps=5)
    group = WorkerGroup(str(root / "base"), cfg.learner, optim(cfg), local=True)
    rows = build_rows(tok, load_samples(data), 64, packing=False)
    for idx in batch_plan(len(rows), 16, steps, seed=0):
        train_step(group, [rows[i] for i in idx], cfg, tok.pad_token_id)
    return group.save_hf(root / "sft", str(root / "base"))


def run_ours(sft: Path, data: DataConfig, prompts: list[list[dict]], a) -> tuple[list[float], list[float]]:
    cfg = Config(model=str(sft), data=data, rewards=RewardSpec(weights={"math": 1.0}), steps=a.steps,
                 prompts_per_step=a.prompts, lr=a.lr, mini_batches=1, micro_batch_size=a.prompts * a.G,
                 overlong="none", dynamic_sampling=False,
                 rollout=RolloutConfig(group_size=a.G, max_new_tokens=a.max_new_tokens, reasoning="think_high",
                                       batch_size=a.prompts * a.G))  # one generate call per step, as TRL
    torch.manual_seed(0)
    learner, worker, scorer = GRPOLearner(str(sft), cfg, local=True), RolloutWorker(str(sft), cfg.rollout), CombinedReward(cfg.rewards)
    pad = load_tokenizer(sft).pad_token_id
    probe = probe_rows(load_tokenizer(sft), [s for batch in prompts for s in batch], cfg)
    times, rewards = [], []
    for step, batch in enumerate(prompts):
        t0 = time.perf_counter()
        rollouts = worker.generate(batch, 0, step)
        results = scorer([r.reward_sample() for r in rollouts])
        keep, adv, m = score_and_advantages(rollouts, results, cfg)
        learner.train_step(collate_rollouts([rollouts[i] for i in keep], adv, pad) if keep else None)
        sync_weights(learner.group, [worker], probe, check=step % a.probe_every == 0)  # as the stage does
        times.append(time.perf_counter() - t0)
        rewards.append(m["reward/mean"])
    return times, rewards


def run_trl(sft: Path, prompts: list[list[dict]], a, out: Path) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": s["messages"], "answer": s["answer"]} for batch in prompts for s in batch]

    def math_reward(prompts, completions, answer, **_):
        return [float(math_correct(c[0]["content"] if isinstance(c, list) else c, g)) for c, g in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(
        output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.prompts * a.G, num_generations=a.G,
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta2=0.95, max_grad_norm=1.0, weight_decay=0.0, beta=0.0, temperature=1.0,
        max_completion_length=a.max_new_tokens, use_vllm=False, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
        top_k=0, steps_per_generation=1, use_cpu=True, bf16=False,
        logging_steps=1, report_to="none", save_strategy="no", seed=0, shuffle_dataset=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=load_model(sft), reward_funcs=[math_reward], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(sft), callbacks=[timer])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return timer.times, rewards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--sft-steps", type=int, default=500)
    p.add_argument("--probe-every", type=int, default=1, help="prove the weight sync every N steps (the stage: 1)")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = DataConfig(domain="math", source="generator", task="experts.tasks:echo_samples", size=600, heldout=64)
        sft = make_sft(root, data, a.sft_steps)
        train = load_samples(data)
        prompts = [[train[i] for i in idx] for idx in batch_plan(len(train), a.prompts, a.steps, seed=0)]
        ours_t, ours_r = run_ours(sft, data, prompts, a)
        trl_t, trl_r = run_trl(sft, prompts, a, root / "trl")
    import trl

    mean = lambda xs: sum(xs[1:]) / max(1, len(xs) - 1)  # noqa: E731
    print(f"\nGRPO on CPU: {a.steps} steps x {a.prompts} prompts x G={a.G}, <= {a.max_new_tokens} new tokens, TRL {trl.__version__}")
    print(f"{'step':>4} {'ours reward':>12} {'TRL reward':>11} {'ours s':>7} {'TRL s':>7}")
    for i in range(a.steps):
        g = lambda xs: f"{xs[i]:.3f}" if i < len(xs) else "-"  # noqa: E731
        print(f"{i + 1:>4} {g(ours_r):>12} {g(trl_r):>11} {g(ours_t):>7} {g(trl_t):>7}")
    print(f"mean step time: ours {mean(ours_t):.3f}s, TRL {mean(trl_t):.3f}s")
    half = a.steps // 2
    print(f"reward, last {a.steps - half} steps: ours {sum(ours_r[half:]) / (a.steps - half):.3f}, "
          f"TRL {sum(trl_r[half:]) / max(1, len(trl_r) - half):.3f}")
    print(f"ours vs TRL GRPO step time: ratio {mean(ours_t) / mean(trl_t):.2f} (target <= 0.8)")
    trl_last = sum(trl_r[half:]) / max(1, len(trl_r) - half)
    print(f"ours vs TRL GRPO reward, second half: ratio {(sum(ours_r[half:]) / (a.steps - half)) / max(trl_last, 1e-9):.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
