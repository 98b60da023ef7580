"""Deferred weight-gradient GEMMs: DualPipe's W (report section 3.2.1, Figure 5).

DualPipe splits a backward into B, the gradient of the stage's input that the previous stage
waits for, and W, the weight gradients, run later to fill the pipeline's bubbles. A store defers
exactly the GEMMs W needs: while `store.collecting()` is active, a backward runs in full and
frees its graph as usual, except that each linear and expert GEMM of this project keeps its input
and output gradient in the store instead of computing dW = dy^T x. `store.flush()` (W) then runs
them and hands each dW to the edge autograd would have sent it along (the weight's
AccumulateGrad, or the cast in front of it under autocast), so gradient hooks such as
Megatron-Core DDP's `main_grad` accumulation see every weight gradient as they would without
the store. Everything else (norms, the embedding, the router, a layer that is not one of these)
gets its gradient during B.

Who defers: `Linear` (nn.Linear, this project's linears), the FP8 GEMMs (`fp8/linear.py`) and the
routed experts' GEMMs (`model/moe/experts.py`), each through `weight_grad` in its autograd
function's backward. The forwards stay plain: nothing changes unless a store is collecting.

    store = WeightGradStore()
    with store.collecting():
        torch.autograd.backward(output, output_grad)   # B: input gradient, graph freed
    ...
    store.flush()                                       # W
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge

WeightGradient = Callable[[], torch.Tensor]

# The stores collecting now, innermost last: a backward runs on the autograd engine's threads, so
# this is process-wide, not thread-local; a rank runs one backward at a time.
_collecting: list["WeightGradStore"] = []


class WeightGradStore:
    """The weight-gradient GEMMs of one backward (one micro-batch on one stage), until its W."""

    def __init__(self) -> None:
        self._pending: list[tuple[WeightGradient, GradientEdge, tuple[torch.Tensor, ...]]] = []

    @contextlib.contextmanager
    def collecting(self) -> Iterator["WeightGradStore"]:
        """Backwards run inside defer their weight-gradient GEMMs to this store."""
        _collecting.append(self)
        try:
            yield self
        finally:
            _collecting.pop()

    def put(self, compute: WeightGradient, edge: GradientEdge, holds: tuple[torch.Tensor, ...]) -> None:
        """Defer `compute()`, the gradient that goes along `edge`; `holds`: the tensors it keeps."""
        self._pending.append((compute, edge, holds))

    def flush(self) -> None:
        """W: every deferred GEMM in the order the backward met them, each gradient handed to its
        weight's edge at once (at most one weight gradient alive beyond autograd's own)."""
        pending, self._pending = self._pending, []
        while pending:
            compute, edge, _ = pending.pop(0)
            with torch.no_grad():  # as inside a backward: the GEMM records no graph
                grad = compute()
            torch.autograd.backward([edge], [grad])

    def __len__(self) -> int:
        return len(self._pending)

    def tensors(self) -> list[torch.Tensor]:
        """What the deferred GEMMs keep alive (inputs and output gradients), for memory accounting."""
        return [t for _, _, holds in self._pending for t in holds]


def weight_grad(ctx, index: int, compute: WeightGradient, *holds: torch.Tensor) -> Optional[torch.Tensor]:
    """For an autograd function's backward: the gradient of its input `index` (a weight), which
    `compute()` gives from the tensors `holds`. Computed now, or, while a store is collecting, deferred to
    it (None is returned: autograd then sends nothing along that edge until the store's W)."""
    if not ctx.needs_input_grad[index]:
        return None
    if not _collecting:
        return compute()
    node, output_nr = ctx.next_functions[index]
    _collecting[-1].put(compute, GradientEdge(node, output_nr), holds)
    return None


class _LinearFn(torch.autograd.Function):
    """y = x W^T (+ b) with the GEMMs autograd's linear runs (the same calls, so the same bits),
    its weight gradient through `weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        x_MK, dy_MN = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = dy_MN.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = weight_grad(ctx, 1, lambda: dy_MN.t().mm(x_MK), x_MK, dy_MN)
        db = dy_MN.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class Linear(nn.Linear):
    """nn.Linear whose weight gradient a `WeightGradStore` can defer (same parameters, same
    state_dict, same results). Under autocast its inputs are cast as autocast casts a linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        weight, bias = self.weight, self.bias
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return _LinearFn.apply(x, weight, bias)


def can_defer(module: nn.Module) -> bool:
    """Whether any of `module`'s GEMMs defers its weight gradient to a collecting store."""
    return any(isinstance(m, Linear) for m in module.modules())
