"""The optimizer side of a step, one interface for two optimizers (`zero_grad`, `step(lr) -> grad
norm`, `param_states` / `load_param_states`, `master_weights` / `load_master_weights`,
`step_count`, `state_bytes`):

- `local.LocalOptimizer`: gradient averaging over data-parallel ranks, global-norm clipping and
  our AdamW, with the whole Adam state on every replica;
- `zero1.ZeRO1Optimizer`: Megatron-Core's DDP and distributed optimizer (ZeRO-1).

Both save moments in one layout, so a run resumes under either. `local` also holds the
warmup + cosine learning rate and the piecewise-constant schedules (gamma, lambda).
"""
from megatron_dsv3.optim.local import (MOMENTS, AdamW, LocalOptimizer, learning_rate,  # noqa: F401
                                       scheduled)
