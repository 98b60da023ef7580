"""The local optimizer: gradient averaging over data-parallel ranks, global-norm clipping, AdamW
with FP32 master weights and optional BF16 moments (report section 3.3.3), the whole Adam state
on every data-parallel replica; and the warmup + cosine learning rate and value schedules.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_dsv3.parallel import comm, groups
from megatron_dsv3.parallel.sharding import is_primary


def all_reduce_flat(tensors: list[torch.Tensor], group: Optional[dist.ProcessGroup]) -> None:
    """Sum every tensor over `group` in place, with one collective."""
    if not tensors or groups.size(group) == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    comm.all_reduce(flat, group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def average_gradients(model: nn.Module, mirror: Optional[dist.ProcessGroup] = None) -> None:
    """Mean of the data-parallel replicas' gradients.

    Dense parameters are summed over the data-parallel group. An expert's gradient already holds
    the contributions of every token its expert-parallel group dispatched to it; summing over the
    expert-data-parallel group adds the other replicas' tokens. Both are divided by the
    data-parallel size, since each replica's loss is a mean over its own tokens. Finally the
    embedding held by the first pipeline stage and by the last (for MTP) sums its two gradients."""
    dp_size = groups.size(groups.dp_group())
    dense = [p.grad for p in model.parameters() if p.grad is not None and not getattr(p, "expert_parallel", False)]
    experts = [p.grad for p in model.parameters() if p.grad is not None and getattr(p, "expert_parallel", False)]
    all_reduce_flat(dense, groups.dp_group())
    all_reduce_flat(experts, groups.expert_dp_group())
    if dp_size > 1:
        for grad in dense + experts:
            grad.div_(dp_size)
    shared = [p for p in model.parameters() if getattr(p, "pipeline_copy", None) is not None]
    for p in shared:
        if p.grad is None:  # the MTP copy is unused while the MTP loss weight is 0
            p.grad = torch.zeros_like(p)
    if shared:  # only the first and last stages hold it
        all_reduce_flat([p.grad for p in shared], groups.embedding_group())
    sum_mirrored(model, mirror)


@torch.no_grad()
def sum_mirrored(model: nn.Module, mirror: Optional[dist.ProcessGroup]) -> None:
    """DualPipe (report section 3.2.1): the two ranks of `mirror` hold the same stages, each having
    run half of the micro-batches through them; the sum of their gradients is every micro-batch's,
    and keeps the two copies equal after the step (ZeRO-1 sums its main-gradient buffers itself)."""
    if mirror is None:
        return
    params = list(model.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_flat([p.grad for p in params], mirror)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip by the norm of the whole model's gradient (every stage, every shard, each counted
    once: by its primary replica, and not on a DualPipe mirror copy); returns that norm before
    clipping."""
    square = torch.zeros(1, dtype=torch.float64, device=next(model.parameters()).device)  # summed where the grads are
    for p in model.parameters():
        if p.grad is not None and is_primary(p) and not getattr(p, "mirror_copy", 0):
            square += p.grad.double().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        comm.all_reduce(square, groups.world_group())
    norm = float(square.sqrt())  # the one host read
    if max_norm > 0 and norm > max_norm:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay for matrices, none for vectors (norm scales)."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam on FP32 master parameters; moments in `moment_dtype`. Each
    group's `weight_decay` applies to all its parameters (see `decay_groups`).

    State is created eagerly so a checkpoint can be loaded before the first step."""

    def __init__(self, params: Iterable, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, moment_dtype: torch.dtype = torch.float32):
        super().__init__(list(params), dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.step_count, self.moment_dtype = 0, moment_dtype
        self.init_state()

    def init_state(self) -> None:
        """Zero moments for every parameter of `param_groups` (call again after replacing them)."""
        self.state.clear()
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {"exp_avg": torch.zeros_like(p, dtype=self.moment_dtype),
                                 "exp_avg_sq": torch.zeros_like(p, dtype=self.moment_dtype)}

    @torch.no_grad()
    def step(self, closure=None):
        self.step_count += 1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            correction1 = 1 - beta1 ** self.step_count
            correction2 = 1 - beta2 ** self.step_count
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (exp_avg_sq / correction2).sqrt_().add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-group["lr"] / correction1)


MOMENTS = ("exp_avg", "exp_avg_sq")


class LocalOptimizer:
    """`AdamW` over this rank's parameters after `average_gradients` and `clip_grad_norm`: the
    Adam state is replicated over data-parallel ranks. `mirror`: DualPipe's group of the two
    ranks holding the same stages (their gradients are summed)."""

    def __init__(self, model: nn.Module, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.1,
                 clip_grad: float = 1.0, moment_dtype: torch.dtype = torch.float32,
                 mirror: Optional[dist.ProcessGroup] = None):
        self.model, self.clip_grad, self.mirror = model, clip_grad, mirror
        self.adam = AdamW(decay_groups(model.parameters(), weight_decay), lr=lr, betas=betas, moment_dtype=moment_dtype)

    @property
    def step_count(self) -> int:
        return self.adam.step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.adam.step_count = value

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def step(self, lr: float) -> float:
        """Average gradients over replicas, clip, update; returns the norm before clipping."""
        average_gradients(self.model, self.mirror)
        grad_norm = clip_grad_norm(self.model, self.clip_grad)
        for group in self.adam.param_groups:
            group["lr"] = lr
        self.adam.step()
        return grad_norm

    def state_bytes(self) -> int:
        """Bytes of Adam moments held by this rank."""
        return sum(t.numel() * t.element_size() for state in self.adam.state.values() for t in state.values())

    def param_states(self, empty: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Adam moments by parameter name, each shaped like this rank's parameter."""
        return {name: {m: self.adam.state[p][m] for m in MOMENTS} for name, p in self.model.named_parameters()}

    @torch.no_grad()
    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, p in self.model.named_parameters():
            for m in MOMENTS:
                self.adam.state[p][m].copy_(states[name][m])

    def master_weights(self, empty: bool = False) -> dict[str, torch.Tensor]:
        return {}  # the parameters are the FP32 master weights

    def load_master_weights(self, weights: dict[str, torch.Tensor]) -> None:
        pass


def learning_rate(step: int, total: int, peak: float, minimum: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to `minimum` at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * progress))


def scheduled(value_schedule: Optional[list], tokens_seen: float, default: float) -> float:
    """Piecewise-constant schedule [[tokens_from, value], ...] evaluated at `tokens_seen`."""
    if not value_schedule:
        return default
    value = default
    for start, v in sorted(value_schedule, key=lambda item: float(item[0])):
        if tokens_seen >= float(start):
            value = float(v)
    return value
