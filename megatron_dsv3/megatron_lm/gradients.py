"""The gradient sums of the dual schedules' chunks that Megatron's `finalize_model_grads` does not do.

Megatron keeps one copy of each parameter per pipeline position, apart from the embedding, whose
copies on other pipeline ranks it sums over its embedding group. Under the dual schedules:

- both ends of the model sit on pipeline rank 0, so the MTP stage's copy of the embedding is on
  the same rank as the embedding itself: their gradients are summed on the rank (Megatron's
  embedding group holds that rank alone, `step.embedding_ranks`);
- DualPipe holds every stage twice, on pipeline ranks r and PP-1-r, each copy running half of the
  micro-batches (report section 3.2.1): their gradients, and the routing load the expert-bias
  step reads, are summed over that pair (`groups.mirror_group()`), so both copies take the same
  step. The builder marks the copies on ranks >= PP/2 `shared` (`model.ChunkBuilder`), which
  Megatron's gradient norm leaves out, so each stage counts once.

`finalize_model_grads(schedule, megatron_finalize)` wraps Megatron's function with these sums; the
entry point puts it where Megatron-LM's `train()` takes it from. Being the step's last call before
Megatron-LM logs it, it also brings the MTP losses to the rank that logs them
(`mtp_metrics_to_the_last_rank`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.core.utils import get_attr_wrapped_model

from megatron_dsv3.megatron_lm.arguments import dual
from megatron_dsv3.megatron_lm.model import whole_model_name
from megatron_dsv3.parallel import comm, groups


def _unwrapped(chunk: Any) -> Any:
    return get_attr_wrapped_model(chunk, "pre_process", return_model_obj=True)


def copies(chunks: list) -> dict[str, list[torch.nn.Parameter]]:
    """This rank's trainable parameters by whole-model name (several where a chunk repeats one)."""
    held: dict[str, list[torch.nn.Parameter]] = {}
    for chunk in map(_unwrapped, chunks):
        for name, param in chunk.named_parameters():
            if param.requires_grad:
                held.setdefault(whole_model_name(chunk, name), []).append(param)
    return held


def _gradient(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    return getattr(param, "main_grad", None) if getattr(param, "main_grad", None) is not None else param.grad


def sum_rank_copies(chunks: list) -> None:
    """Give every copy of a parameter on this rank the sum of their gradients."""
    for params in copies(chunks).values():
        grads = [g for g in map(_gradient, params) if g is not None]
        if len(grads) > 1:
            total = torch.stack(grads).sum(dim=0)
            for grad in grads:
                grad.copy_(total)


def sum_mirror_copies(chunks: list, group: Any) -> None:
    """Sum each parameter's gradient with its copy on the mirror rank (both hold the same names),
    after `sum_rank_copies`: one copy per name goes over the wire, the others on the rank take it."""
    held = [params for _, params in sorted(copies(chunks).items()) if _gradient(params[0]) is not None]
    if not held:
        return
    grads = [_gradient(params[0]) for params in held]
    flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), group)
    for params, grad, summed in zip(held, grads, flat.split([g.numel() for g in grads])):
        grad.copy_(summed.view_as(grad))
        for other in params[1:]:
            _gradient(other).copy_(grad)


def sum_mirror_load(chunks: list, group: Any) -> None:
    """Sum the routers' token counts (what Megatron's expert-bias step reads) over the mirror pair."""
    routers = sorted(((whole_model_name(chunk, name), module) for chunk in map(_unwrapped, chunks)
                      for name, module in chunk.named_modules() if hasattr(module, "local_tokens_per_expert")),
                     key=lambda item: item[0])
    if routers:
        counts = comm.all_reduce(torch.stack([m.local_tokens_per_expert for _, m in routers]), group)
        for (_, module), summed in zip(routers, counts):
            module.local_tokens_per_expert.copy_(summed)


def mtp_metrics_to_the_last_rank(mtp_layers: int, pipeline_group: Any) -> None:
    """After a dual schedule's step, before Megatron-LM logs: Megatron logs the MTP losses on the
    last pipeline rank from what its MTP layers put in `MTPLossLoggingHelper.tracker` on their own
    rank, and sums them over no pipeline group (its MTP sits on the last rank). The dual schedules
    run MTP on rank 0 (DualPipe also on rank PP-1, each copy half the micro-batches): every rank
    gets the tracker's sums (zeros where no MTP ran), summed over the pipeline group when Megatron
    reduces them. The tracker's keys: 0.19 keeps loss, correct and total counts; earlier releases
    the loss alone, as "values"."""
    tracker = MTPLossLoggingHelper.tracker
    keys = (("loss_values", "correct_values", "total_values")
            if hasattr(MTPLossLoggingHelper, "save_metrics_to_tracker") else ("values",))
    for key in keys:
        if key not in tracker:
            tracker[key] = torch.zeros(mtp_layers, device=comm.device_of(pipeline_group))
    tracker["reduce_group"] = pipeline_group


def finalize_model_grads(schedule: str, megatron_finalize: Callable) -> Callable:
    """Megatron's `finalize_model_grads` (DP reduction, embedding group, expert-bias step, token
    scaling) with the dual schedules' sums around it; Megatron's own for the other schedules."""
    descriptor = dual(schedule)
    if descriptor is None:
        return megatron_finalize

    def finalize(model: list, *args: Any, **kwargs: Any) -> Any:
        mirror = groups.mirror_group() if descriptor.model_copies == 2 else None
        if mirror is not None:
            sum_mirror_load(model, mirror)
        result = megatron_finalize(model, *args, **kwargs)
        sum_rank_copies(model)
        if mirror is not None:
            sum_mirror_copies(model, mirror)
        mtp_layers = get_attr_wrapped_model(model[0], "config").mtp_num_layers
        if mtp_layers:  # not a gradient: the step's last call before Megatron-LM logs it
            mtp_metrics_to_the_last_rank(mtp_layers, groups.pp_group())
        return result

    finalize.dsv3_schedule = schedule
    return finalize


@contextlib.contextmanager
def installed(schedule: str) -> Iterator[None]:
    """Make Megatron-LM's `train()` take `finalize_model_grads(schedule, ...)`: it sets
    `config.finalize_model_grads_func` from the name `megatron.training.training` imported."""
    from megatron.training import training  # here: megatron.training is absent where only megatron.core is

    original = training.finalize_model_grads
    training.finalize_model_grads = finalize_model_grads(schedule, original)
    try:
        yield
    finally:
        training.finalize_model_grads = original
