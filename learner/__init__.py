"""One learner toolkit for every trainer (SFT, GRPO learner and reference, reward model, OPD student).

A stage's loop is written once against a `WorkerGroup` (`group.train_step(batch, objective)`,
`group.forward(batch, fn)`, `group.save(...)`), as in verl: the group is `learner.workers` Ray
actors in one placement group, joined by torch.distributed (gloo on CPU, NCCL on GPU), with the
model sharded by FSDP2 (`fully_shard` per decoder layer, then the root) or replicated by DDP. The
group splits each batch over ranks balanced by tokens and sums what comes back; no stage loop knows
how many workers there are, and `workers: 1` runs the very same code.

- `learner.config`: the `learner:` block of every training stage;
- `learner.worker`: one rank (a plain class; the group wraps it in a Ray actor);
- `learner.group`: the controller's handle on the ranks: placement, splitting, failures;
- `learner.optim`: optimizer and schedule; `learner.checkpoint`: resumable sharded checkpoints
  (torch.distributed.checkpoint, loadable by another number of workers) and gathered HF ones;
- `learner.batching`: the step plan of a data set and the token-balanced split.
"""
