"""What a run needs from its machine, checked by dsv3-train before anything is allocated.

- Memory: the plan's per-rank estimate (`memory.py`: weights, gradients, optimizer states and the
  activations of the micro-batches in flight) against the device: the GPU's memory, or on CPU
  this rank's share of the host's memory (its cgroup limit when lower). A batch the estimate
  says cannot fit is refused by name instead of dying in an allocation (or in the kernel's OOM
  killer) minutes later.
- Disk: `checkpoint_bytes`, the size of one checkpoint (FP32 weights and both Adam moments of
  the whole model), which `checkpoint.lock.claim` wants free in `checkpoint.dir` at start.

    check_fits(plan, ranks_per_node=8)        # PlanError naming the estimate and the capacity
    claim(run.checkpoint.dir, checkpoint_bytes(plan))
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import psutil
import torch

from megatron_dsv3.memory import GIB, count_params
from megatron_dsv3.plan import PlanError, RunPlan

CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")  # cgroup v2: "max" or bytes


def host_memory_bytes() -> int:
    """The host's memory, or the cgroup's limit when the process runs under a lower one."""
    total = psutil.virtual_memory().total
    try:
        limit = CGROUP_LIMIT.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def device_memory_bytes(device: str, ranks_per_node: int) -> tuple[int, str]:
    """(bytes one rank may use, what they are) on `device`."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"the {props.total_memory / GIB:.1f} GiB of {props.name}"
    share = host_memory_bytes() // max(1, ranks_per_node)
    return share, (f"this rank's share of the host's memory ({share / GIB:.1f} GiB"
                   + (f", 1/{ranks_per_node} of it" if ranks_per_node > 1 else "") + ")")


def check_fits(plan: RunPlan, ranks_per_node: int, capacity: Optional[tuple[int, str]] = None) -> None:
    """Refuse a plan whose memory estimate exceeds what a rank has (`capacity`: bytes and words)."""
    available, where = capacity or device_memory_bytes(plan.device, ranks_per_node)
    estimate = plan.memory()
    if estimate.total > available:
        train = plan.run.train
        raise PlanError(
            f"the plan's memory estimate, {estimate.total / GIB:.1f} GiB per rank ({estimate.activations / GIB:.1f} GiB "
            f"of them activations of train.micro_batch_size={train.micro_batch_size} x train.seq_length="
            f"{train.seq_length}), is above {where}: lower the micro-batch or the sequence length, or add parallel "
            "ranks")


def checkpoint_bytes(plan: RunPlan) -> int:
    """One checkpoint of the whole model: FP32 weights (BF16 ones are saved as their FP32 masters) and
    two Adam moments per parameter, MTP modules included."""
    model = plan.model
    counts = count_params(model)
    params = counts.total + model.mtp_num_modules * counts.mtp_module
    moment_bytes = 2 if plan.run.train.bf16_adam_moments else 4
    return params * (4 + 2 * moment_bytes)
