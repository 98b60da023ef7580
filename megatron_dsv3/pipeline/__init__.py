"""Pipeline schedules by name, registered as `registry` kind "schedule" and chosen with
`parallel.schedule`. Each entry makes a forward/backward function with Megatron-Core's signature
(`forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size`).
"1f1b" is Megatron-Core's own: 1F1B across pipeline stages, a plain micro-batch loop without.
How a stage is cut and driven: `stages.py`."""
from __future__ import annotations

from typing import Callable


def megatron_1f1b() -> Callable:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


SCHEDULES: dict[str, Callable[[], Callable]] = {"1f1b": megatron_1f1b}
