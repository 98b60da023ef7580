"""What several test files share: local gloo ranks with a hard time limit (`distributed`), the
rank job server and its client (`train_ranks`, `rank_server`), the parallel-correctness worker
(`parallel_worker`) and an offline wandb run's history rows (`wandb_history`). The session's guards (a temporary HOME, DSV3_SYSTEM_TESTS, no process left
behind) are in tests/conftest.py.

`tests/` is on `sys.path` under pytest (tests/conftest.py sits there), so test files import
`helpers.<module>`; the worker and the job server also run as scripts.
"""
