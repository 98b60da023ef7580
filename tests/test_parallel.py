"""Tensor, expert and data parallelism on CPU (gloo): one step equals the single-process step.

Each layout runs the same global batch of 8 sequences (2 micro-batches of 2 per data-parallel
rank where it has them) from the same initial weights. Tolerance: loss and every full gradient
within 1e-5 absolute + 1e-4 relative of the single-process reference (fp32; they differ only by
summation order across ranks).
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_ranks

WORKER = "tests/parallel_worker.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    run_ranks(1, [WORKER, "step", str(out), "--write-state"])
    return out, torch.load(out / "rank0.pt")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tensor,expert,world", [(2, 1, 2), (1, 2, 2), (1, 1, 2), (2, 2, 4)],
                         ids=["TP2", "EP2", "DP2", "TP2xEP2xDP2"])
def test_one_step_matches_single_process(reference, tensor, expert, world):
    out, ref = reference
    for stale in out.glob("rank[1-9]*.pt"):
        stale.unlink()
    run_ranks(world, [WORKER, "step", str(out), "--tensor", str(tensor), "--expert", str(expert)])
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    got = ranks[0]

    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # The bias step comes from the global load: identical on every rank and equal to the reference.
    for r in ranks:
        torch.testing.assert_close(r["bias"], ref["bias"], atol=0, rtol=0)
    assert ref["bias"].abs().sum() > 0
    if expert > 1:  # tokens really left their rank through the all-to-all
        assert all(r["sent_away"] > 0 for r in ranks)


@pytest.mark.timeout(300)
def test_node_limited_routing_bounds_destination_nodes(tmp_path):
    """EP4 with one emulated node per rank: 4 routing groups of 2 experts = one group per node.
    Top-4 over 2 of 4 groups reaches at most 2 nodes; without the group limit tokens reach more."""
    run_ranks(4, [WORKER, "node_limited", str(tmp_path), "--ranks-per-node", "1"])
    for rank in range(4):
        nodes = torch.load(tmp_path / f"nodes{rank}.pt")
        assert len(nodes[2]) > 0
        assert max(nodes[2]) <= 2
        assert max(nodes[4]) > 2  # the same count detects tokens spread over more nodes
