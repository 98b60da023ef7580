"""Pipeline schedules by name. "1f1b" is Megatron-Core's own forward/backward function."""
from __future__ import annotations

from typing import Callable


def megatron_1f1b() -> Callable:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


SCHEDULES: dict[str, Callable[[], Callable]] = {"1f1b": megatron_1f1b}
