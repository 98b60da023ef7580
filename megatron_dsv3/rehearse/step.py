"""One rank's training step measured: the trainer's own build and step, under the memory tracker.

`measure_step` runs in an initialised process group, real (gloo ranks: a run) or torch's fake one
(a rehearsal on meta, `rehearsal.py`), and in both builds this rank with dsv3-train's code
(`Trainer.build_parallel`, `Trainer.build_model`: the plan's stage cut, the experts of this
expert-parallel rank, DualPipe's copies, ZeRO-1 shards, FP8) and runs `Trainer.device_step` once,
every micro-batch through the configured schedule, then the optimizer and routing-bias steps.
Only the data differ from dsv3-train: token ids of the right shape (their values matter only to
the router, whose counts a routing assumption gives, or forces in a real run).
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_dsv3.parallel import groups
from megatron_dsv3.plan import RunPlan
from megatron_dsv3.rehearse.routing import assume_routing, forced_routing
from megatron_dsv3.rehearse.tracker import MemoryReport, MemoryTracker
from megatron_dsv3.run_config import RunConfig
from megatron_dsv3.train import Trainer


@dataclass
class RankPlace:
    """Where this rank sits in the layout, and the model stages it holds."""

    rank: int
    pipeline_rank: int
    expert_rank: int
    data_rank: int
    stages: tuple[int, ...]
    layers: tuple[int, ...]  # decoder layers of its stages


def token_batches(micro_batch_size: int, seq_length: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Every micro-batch: token ids and labels [micro_batch_size, seq_length], on `device`."""
    tokens = torch.zeros(micro_batch_size, seq_length, dtype=torch.long, device=device)
    return itertools.repeat({"tokens": tokens, "labels": tokens})


def measure_step(run: RunConfig, plan: RunPlan, routing, refuse_cpu: bool) -> tuple[MemoryReport, RankPlace]:
    """Build this rank as dsv3-train does on `plan.device` and run one step under the tracker. On
    meta the dispatchers take their counts from `routing`; on a real device the routers are forced
    to choose experts with `routing`'s counts."""
    trainer = Trainer(run, plan)
    trainer.build_parallel()
    device = torch.device(plan.device)
    trainer.batches = token_batches(run.train.micro_batch_size, run.train.seq_length, device)
    tracker = MemoryTracker(device, refuse_cpu=refuse_cpu)
    with tracker:
        with tracker.phase("build"):
            trainer.build_model()
        tracker.register_training_state(trainer.model, trainer.optimizer)
        _label_phases(trainer, tracker)
        if device.type == "meta":
            assume_routing(trainer.model, routing)
            routed = contextlib.nullcontext()
        else:
            routed = forced_routing(trainer.model, routing)
        trainer.model.train()
        with routed, tracker.step():
            trainer.device_step(*trainer.step_values())
    model = trainer.model
    place = RankPlace(rank=torch.distributed.get_rank(), pipeline_rank=groups.rank(groups.pp_group()),
                      expert_rank=groups.rank(groups.ep_group()), data_rank=groups.rank(groups.dp_group()),
                      stages=model.stages, layers=tuple(int(i) for i in model.layers))
    return tracker.report(), place


def _label_phases(trainer: Trainer, tracker: MemoryTracker) -> None:
    """Name the optimizer's and the routing bias's parts of the step where the tracker reports them."""
    optimizer = trainer.optimizer
    for name, label in (("zero_grad", "zero_grad"), ("step", "optimizer step")):
        method = getattr(optimizer, name)
        setattr(optimizer, name, _labelled(tracker, label, method))


def _labelled(tracker: MemoryTracker, label: str, method):
    def run(*args, **kwargs):
        with tracker.phase(label):
            return method(*args, **kwargs)
    return run
