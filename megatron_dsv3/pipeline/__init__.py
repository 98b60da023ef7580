"""Pipeline schedules by name, registered as `registry` kind "schedule" and chosen with
`parallel.schedule`. Each entry makes a forward/backward function with Megatron-Core's signature
(`forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size`).
"1f1b" is Megatron-Core's own: 1F1B across pipeline stages, a plain micro-batch loop without.
"dualpipe" and "dualpipev" (report section 3.2.1) are ours, in `dualpipe.py`: their model argument
is this rank's two chunks (`parallel.layout.rank_stages`). How a stage is cut and driven: `stages.py`.
Megatron-LM's training loop reaches these through `install(name)` (`megatron_hook.py`)."""
from __future__ import annotations

from typing import Callable

from megatron_dsv3 import registry
from megatron_dsv3.pipeline.megatron_hook import install, installed, uninstall  # noqa: F401


def megatron_1f1b() -> Callable:
    from megatron_dsv3.pipeline.megatron_hook import megatron_choice

    return megatron_choice()


def dualpipe() -> Callable:
    from megatron_dsv3.pipeline.dualpipe import make_forward_backward

    return make_forward_backward("dualpipe")


def dualpipev() -> Callable:
    from megatron_dsv3.pipeline.dualpipe import make_forward_backward

    return make_forward_backward("dualpipev")


SCHEDULES: dict[str, Callable[[], Callable]] = {"1f1b": megatron_1f1b, "dualpipe": dualpipe, "dualpipev": dualpipev}
for _name, _make in SCHEDULES.items():
    registry.register("schedule", _name, _make)
