"""Process groups (tensor, pipeline, expert, data parallel) and the collectives the model uses."""
from megatron_dsv3.parallel.groups import ParallelLayout, initialize_parallel, layout  # noqa: F401
