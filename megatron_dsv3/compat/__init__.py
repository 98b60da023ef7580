"""Version- and device-specific workarounds for Megatron-Core, kept out of the model.

Each workaround is scoped and undoable:

    from megatron_dsv3.compat import cpu_shims, applied
    with cpu_shims():          # no-op when CUDA is available
        print(applied())       # ['megatron.core.tensor_parallel.random:cpu-rng-tracker', ...]
        ...                    # build and run Megatron-Core modules on CPU
    assert applied() == []     # everything restored

`megatron_api` holds the API-drift helpers (building configs across Megatron-Core releases, calling
Megatron-LM's `pretrain()`). `megatron_training_cpu.training_cpu_shims()` extends `cpu_shims()` to
Megatron-LM's training loop; `megatron_training_wheel` and `megatron_mtp_recompute` are release
workarounds that apply with or without CUDA.
"""
from __future__ import annotations

from megatron_dsv3.compat.active import applied
from megatron_dsv3.compat.megatron_api import build_megatron_config, config_value
from megatron_dsv3.compat.megatron_cpu import cpu_shims

__all__ = ["applied", "build_megatron_config", "config_value", "cpu_shims"]
