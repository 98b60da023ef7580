"""Moved to tests/helpers/distributed.py; this re-export stays until every branch imports it there."""
from helpers.distributed import ROOT, free_port, run_ranks  # noqa: F401
