"""Megatron-LM users' door to the registered schedules.

Megatron-Core picks its pipeline schedule in `get_forward_backward_func()` (an if/else over the
pipeline and virtual-pipeline sizes), and `megatron.training` imports that name into its own
module. `install("dualpipev")` rebinds both to return our registered schedule's executor, so a
training loop that asks Megatron-Core for its schedule (megatron.training's `train_step` among
them) runs ours without an edit; `install("1f1b")` (the schedule whose executor is
`megatron_choice`) or `uninstall()` puts Megatron-Core's own choice back. The rebinding is the
only change, and it is undone exactly (the original functions are kept, not re-imported).

    import megatron_dsv3.pipeline
    megatron_dsv3.pipeline.install("dualpipev")   # before megatron.training's train() runs

What is offered to Megatron-LM: the schedule choice. Our schedules drive whatever chunks the
training loop passes (`model` as a list, one module per chunk, each with `set_input_tensor`),
so a loop that builds DualPipeV's V-ordered chunks (rank r: stages r and 2PP-1-r, its descriptor's
`rank_stages` and `stage_cut`, as dsv3-train builds them) runs DualPipeV through Megatron-Core's own call.
Megatron-LM's own model builders place stage v*PP+r on rank r; `megatron_dsv3.megatron_lm`'s
model provider (examples/megatron_lm/pretrain_dsv3.py) builds the dual schedules' chunks for
its `get_model` instead. docs/megatron-lm.md says what works with which.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

from megatron_dsv3 import registry

# Modules that hold the name `get_forward_backward_func`: Megatron-Core's own, and the ones of
# megatron.training that import it (present only where Megatron-LM itself is installed).
_HOLDERS = ("megatron.core.pipeline_parallel.schedules", "megatron.core.pipeline_parallel",
            "megatron.training.training")


def installed() -> Optional[str]:
    """The schedule name `install` put in place, or None while Megatron-Core chooses its own."""
    return getattr(_holder_module(_HOLDERS[0]).get_forward_backward_func, "dsv3_schedule", None)


def install(schedule: str) -> None:
    """Make Megatron-Core's `get_forward_backward_func()` return the executor of the registered
    `schedule` (a name in `megatron_dsv3.registry.names("schedule")`); a schedule whose executor is
    `megatron_choice` (1F1B) puts Megatron-Core's own choice back. Whatever positional or keyword
    arguments a release passes to `get_forward_backward_func` (0.16: pp_size, vp_size) are accepted
    and ignored: the schedule is the one asked for. Each rebound name keeps the function it
    replaced, for `uninstall`."""
    if schedule not in registry.names("schedule"):
        raise KeyError(f"schedule {schedule!r} is not registered; registered: {', '.join(registry.names('schedule'))}")
    descriptor = registry.get("schedule", schedule)  # a `pipeline.schedule.Schedule`
    uninstall()
    if descriptor.executor is megatron_choice:  # Megatron-Core's own choice: nothing to rebind
        return
    forward_backward = descriptor.forward_backward_func()
    for module in _holders():
        def get_forward_backward_func(*args, **kwargs) -> Callable:
            return forward_backward

        get_forward_backward_func.dsv3_schedule = schedule
        get_forward_backward_func.replaced = module.get_forward_backward_func
        module.get_forward_backward_func = get_forward_backward_func


def megatron_choice() -> Callable:
    """Megatron-Core's own schedule for the current parallel state (1F1B across stages, a plain
    loop without), whether or not `install` has rebound its chooser."""
    chooser = _holder_module(_HOLDERS[0]).get_forward_backward_func
    return getattr(chooser, "replaced", chooser)()


def uninstall() -> None:
    """Put back every `get_forward_backward_func` that `install` rebound."""
    for module in _holders():
        module.get_forward_backward_func = getattr(module.get_forward_backward_func, "replaced",
                                                   module.get_forward_backward_func)


def _holders() -> list:
    modules = [_holder_module(name) for name in _HOLDERS]
    return [m for m in modules if m is not None and hasattr(m, "get_forward_backward_func")]


def _holder_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:  # megatron.training ships with Megatron-LM, not with the megatron-core wheel
        return None
