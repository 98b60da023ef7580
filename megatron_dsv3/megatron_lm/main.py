"""`pretrain_dsv3.py`: Megatron-LM's own `pretrain()` training DeepSeek-V3.

    torchrun --nproc-per-node 8 examples/megatron_lm/pretrain_dsv3.py --dsv3-preset deepseek-v3-671b \\
        --pipeline-schedule dualpipev --pipeline-model-parallel-size 8 ... <Megatron-LM's flags>

Megatron-LM keeps its loop, DDP, distributed optimizer, checkpoints and evaluation; this entry
point gives it the model (`model.ChunkBuilder`), the forward step and the data (`step.py`), and
the pipeline schedule chosen by `--pipeline-schedule` (the dual ones through
`megatron_dsv3.pipeline.install`). Without CUDA it runs on the CPU
(`compat.megatron_training_cpu`): the same command on GPUs changes nothing.
"""
from __future__ import annotations

import datetime
import sys
from functools import partial

from megatron.training import get_args

import megatron_dsv3.pipeline
from megatron_dsv3 import exit_status
from megatron_dsv3.compat.megatron_api import list_balancing_types, run_pretrain
from megatron_dsv3.compat.megatron_mtp_recompute import mtp_recompute_padding_mask
from megatron_dsv3.compat.megatron_training_cpu import training_cpu_shims
from megatron_dsv3.config import ConfigError
from megatron_dsv3.megatron_lm import arguments, gradients, model, step
from megatron_dsv3.parallel import groups
from megatron_dsv3.pipeline.schedule import ONE_F_ONE_B


class _Run:
    """The model provider, plus what runs once Megatron has parsed the arguments (before the first
    chunk is built): the entry point's refusals, a fix to Megatron's parsed arguments
    (`list_balancing_types`), DualPipe's mirror groups, and installing the schedule."""

    def __init__(self) -> None:
        self.builder = model.ChunkBuilder()
        self.prepared = False

    def __call__(self, *positional, **keywords):
        if not self.prepared:
            args = get_args()
            problem = arguments.check(args)
            if problem:
                raise arguments.FlagError(problem)
            list_balancing_types(args)
            schedule = arguments.dual(args.pipeline_schedule)
            if schedule is not None and schedule.model_copies == 2:  # the pairs of ranks holding the same two stages
                groups.initialize_mirror_groups(args.pipeline_model_parallel_size,
                                                datetime.timedelta(minutes=args.distributed_timeout_minutes))
            megatron_dsv3.pipeline.install(schedule.name if schedule is not None else ONE_F_ONE_B.name)
            self.prepared = True
        return self.builder(*positional, **keywords)


def main() -> int:
    """Run Megatron-LM's pretrain() on sys.argv; refusals print one line and return exit_status.REFUSED."""
    argv = sys.argv[1:]
    try:
        defaults = arguments.defaults_for(argv)
        schedule = arguments.early_choices(argv).pipeline_schedule
        with training_cpu_shims(), mtp_recompute_padding_mask(), gradients.installed(schedule):
            run_pretrain(step.datasets_provider, _Run(), step.forward_step,
                         extra_args_provider=arguments.extra_args_provider(defaults), args_defaults={},
                         get_embedding_ranks=partial(step.embedding_ranks, schedule))
    except (arguments.FlagError, model.PlacementError, ConfigError) as error:
        print(f"pretrain_dsv3.py: {error}", file=sys.stderr)
        return exit_status.REFUSED
    finally:
        megatron_dsv3.pipeline.uninstall()
    return exit_status.DONE
