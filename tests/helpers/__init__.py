"""What several test files share: local gloo ranks with a hard time limit (`distributed`), the
rank job server and its client (`train_ranks`, `rank_server`), the parallel-correctness worker
(`parallel_worker`) and what its step must equal (`step_check`), a finished run's records and
checkpoints (`run_dirs`), a checkpoint crafted to run a command (`crafted_checkpoint`), the
rehearsal worker (`rehearse_worker`), activation bytes (`activation_memory`) and an offline wandb
run's history rows (`wandb_history`). The session's guards (a temporary HOME, DSV3_SYSTEM_TESTS,
no process left behind) are in tests/conftest.py.

`tests/` is on `sys.path` under pytest (tests/conftest.py sits there), so test files import
`helpers.<module>`; the worker and the job server also run as scripts.
"""
