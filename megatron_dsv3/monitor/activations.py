"""How many bytes a forward pass leaves in memory for its backward: what recomputation
(`train.recompute`) trades for compute, measured rather than estimated."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def bytes_kept_for_backward(model: nn.Module, forward: Callable[[], Any]) -> tuple[Any, int]:
    """Run `forward()`; return its result and the bytes of the distinct storages autograd saved
    for backward, parameters excluded (views of one storage count once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return result, sum(kept.values())
