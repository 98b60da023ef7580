"""One training step of small runs measured by the rehearsal's memory tracker, two ways:

    python tests/helpers/rehearse_worker.py run RUN.yaml CASES             # as a gloo rank (run_ranks)
    python tests/helpers/rehearse_worker.py rehearse WORLD RUN.yaml CASES  # every rank on meta, one process

CASES is a JSON list of override lists, one run each (one process pays Megatron-Core's import for
all). `run` builds and steps this rank on the CPU with dsv3-train's code, its routers forced to
the balanced counts; `rehearse` rehearses each rank of the world on meta with the balanced
assumption. Each prints one line per case and rank: REPORT <case> <rank> <the tracker's JSON>.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dsv3.compat.megatron_cpu import cpu_shims
from megatron_dsv3.plan import make_plan
from megatron_dsv3.rehearse import rehearse
from megatron_dsv3.rehearse.routing import Balanced
from megatron_dsv3.rehearse.step import measure_step
from megatron_dsv3.run_config import load_run_config


def real_steps(config: str, cases: list[list[str]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    try:
        for case, overrides in enumerate(cases):
            plan = make_plan(load_run_config(config, tuple(overrides)), world, world, cuda=False)
            with cpu_shims():
                memory, _ = measure_step(plan.run, plan, Balanced(), refuse_cpu=False)
            parallel_state.destroy_model_parallel()
            print(f"REPORT {case} {dist.get_rank()} {json.dumps(memory.to_dict())}", flush=True)
    finally:
        dist.destroy_process_group()


def rehearsed_steps(world: int, config: str, cases: list[list[str]]) -> None:
    for case, overrides in enumerate(cases):
        run = load_run_config(config, tuple(overrides))
        for rank in range(world):
            memory = rehearse(run, rank, world, world).memory
            print(f"REPORT {case} {rank} {json.dumps(memory.to_dict())}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        real_steps(sys.argv[2], json.loads(sys.argv[3]))
    else:
        rehearsed_steps(int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]))
