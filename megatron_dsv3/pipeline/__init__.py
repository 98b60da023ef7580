"""Pipeline schedules, one `Schedule` descriptor each (`schedule.py`), registered as `registry`
kind "schedule" and chosen with `parallel.schedule`. A descriptor holds the schedule's facts (stages
per rank, copies of the model, micro-batch rule, operation lists for the simulator) and its
executor, a forward/backward function with Megatron-Core's signature (`forward_step_func,
data_iterator, model, num_microbatches, seq_length, micro_batch_size, ...`).

- 1F1B (`schedule.py`): Megatron-Core's own, 1F1B across pipeline stages, a plain micro-batch loop without.
- ZB1P (`schedule.py`): zero-bubble, simulated only (`simulate.py`, dsv3-schedule).
- DualPipe and DualPipeV (report section 3.2.1, `dualpipe.py`): their model argument is this
  rank's two chunks (the descriptor's `rank_stages`).

How a stage is cut and driven: `stages.py`. Megatron-LM's training loop reaches the schedules
through `install(name)` (`megatron_hook.py`).
"""
from megatron_dsv3.pipeline import dualpipe  # noqa: F401  (registers DualPipe and DualPipeV)
from megatron_dsv3.pipeline.megatron_hook import install, installed, uninstall  # noqa: F401
from megatron_dsv3.pipeline.schedule import Schedule, ScheduleRefused, get as get_schedule  # noqa: F401
from megatron_dsv3.pipeline.schedule import register as register_schedule  # noqa: F401
