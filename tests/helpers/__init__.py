"""What several test files share: local gloo ranks with a hard time limit (`distributed`), the
rank job server and its client (`train_ranks`, `rank_server`), the parallel-correctness worker
(`parallel_worker`), and the session's guards against changing the machine (`machine`).

`tests/` is on `sys.path` under pytest (tests/conftest.py sits there), so test files import
`helpers.<module>`; the worker and the job server also run as scripts.
"""
