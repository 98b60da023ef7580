"""Pipeline schedules by name, registered as `registry` kind "schedule" and chosen with
`parallel.schedule`. Each entry makes a forward/backward function with Megatron-Core's signature
(`forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size`).
"1f1b" is Megatron-Core's own: 1F1B across pipeline stages, a plain micro-batch loop without.
"dualpipe" and "dualpipev" (report section 3.2.1) stand in the registry so that every entry point
knows their names, but refuse by name when a run asks for them: they are not implemented yet.
How a stage is cut and driven: `stages.py`."""
from __future__ import annotations

from typing import Callable


def megatron_1f1b() -> Callable:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


def not_implemented(name: str) -> Callable[[], Callable]:
    def refuse() -> Callable:
        from megatron_dsv3.run_config import RunConfigError

        raise RunConfigError(f"parallel.schedule={name!r} is registered but not implemented yet; "
                             "use parallel.schedule=1f1b (Megatron-Core's 1F1B) for this layout")

    return refuse


SCHEDULES: dict[str, Callable[[], Callable]] = {
    "1f1b": megatron_1f1b, "dualpipe": not_implemented("dualpipe"), "dualpipev": not_implemented("dualpipev")}
