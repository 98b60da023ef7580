"""Slurm launch for dsv3-train: run YAML -> the run's plan on the job's nodes (preflight) -> sbatch
script -> submission.

    run = load_run("examples/671b-2048xh800.yaml")
    report = preflight(run)                      # PreflightError names what to change
    script = render_sbatch(run, "examples/671b-2048xh800.yaml", report=report)
    job_id = submit(script_path)                 # after writing `script` there
"""
from megatron_dsv3.launch.preflight import PreflightError, PreflightReport, preflight  # noqa: F401
from megatron_dsv3.launch.presets import cuda_device_max_connections, environment, load_preset  # noqa: F401
from megatron_dsv3.launch.render import render_sbatch, train_command  # noqa: F401
from megatron_dsv3.launch.run import LaunchConfigError, load_run, tasks_per_node, world_size  # noqa: F401
from megatron_dsv3.launch.submit import submit  # noqa: F401
