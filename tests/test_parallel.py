"""Tensor, pipeline, expert and data parallelism on CPU (gloo): one step equals the single-process step.

Each layout runs the same global batch of 8 sequences (2 micro-batches of 2 per data-parallel
rank where it has them; pipelined layouts run them through Megatron-Core's 1F1B schedule) from the
same initial weights, then one optimizer step: ours (`local`) or Megatron-Core's DDP + distributed
optimizer (`ZeRO-1`). Tolerances (fp32; results differ only by summation order across ranks):
loss within 1e-5 relative, grad norm 1e-4 relative; every full gradient within 1e-5 absolute +
1e-4 relative; Adam moments (0.1 g and 0.05 g^2 after one step) within 1e-4 relative.

Updated parameters are checked by what one Adam step determines, not against the reference's
within a blanket tolerance. After bias correction the first step moves a parameter by
lr * g / (|g| + eps) (plus weight decay): about lr * sign(g) where |g| >> eps, but where |g| is
near eps the summation-order noise that the moment tolerance allows can move it anywhere in
[-lr, lr], so no fixed tolerance on the parameters is both safe and meaningful. What the step
does determine is the parameter from the initial weights and the moments: each rank's updated
parameters must equal AdamW's first step computed from its own moments to float rounding, and
its moments must equal the reference's (above). Tensors without moments (the routing bias) are
compared exactly.
"""
from __future__ import annotations

import pytest
import torch

from helpers.distributed import run_ranks

WORKER = "tests/helpers/parallel_worker.py"
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 1e-8, 0.1  # the worker's AdamW (ours and Megatron's)


def adam_first_step(initial: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """The parameter AdamW's first step makes from `initial` and the moments it recorded; weight
    decay on matrices only, as both optimizers apply it."""
    decay = WEIGHT_DECAY if initial.dim() > 1 else 0.0
    first, second = exp_avg / (1 - BETAS[0]), exp_avg_sq / (1 - BETAS[1])
    return initial * (1 - LR * decay) - LR * first / (second.sqrt() + EPS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    run_ranks(1, [WORKER, "step", str(out), "--write-state"])
    return out, torch.load(out / "rank0.pt")


def assert_step_matches(ref: dict, ranks: list[dict], initial: dict, optimizer: str) -> None:
    """One training step of parallel `ranks` equals the single-process `ref`: losses, grad norm,
    every gradient, every updated parameter (AdamW's first step from `initial` and the rank's own
    moments), the moments within their tolerances, and the routing biases bitwise."""
    assert ref["grad_norm"] > 0.5  # the worker clips at 0.5: the update depends on the norm
    for got in ranks:  # every rank agrees on the model's losses (summed over stages) and the norm
        for key in ("loss", "mtp_loss", "balance_loss"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5), key
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    # Each rank holds the gradients of its pipeline stage; together they cover the whole model,
    # and a tensor held on two stages (the embedding MTP shares) has the full gradient on both.
    # ZeRO-1 keeps only a slice of each gradient; its moments below are the gradients' record.
    if optimizer == "local":
        assert set().union(*(r["grads"] for r in ranks)) == ref["grads"].keys()
    for r in ranks:
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, ref["grads"][name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # The update: every stage's parameters and Adam moments, gathered over TP/EP (and, for ZeRO-1,
    # over the data-parallel slices), equal the single process's.
    assert set().union(*(r["params"] for r in ranks)) == ref["params"].keys()
    for r in [ref, *ranks]:  # the reference too: the formula is the optimizers'
        for name, value in r["params"].items():
            if name in r["moments"]["exp_avg"]:
                expected = adam_first_step(initial[name], r["moments"]["exp_avg"][name],
                                           r["moments"]["exp_avg_sq"][name])
                torch.testing.assert_close(value, expected, atol=2e-7, rtol=1e-6, msg=lambda m: f"{name}: {m}")
            else:
                torch.testing.assert_close(value, ref["params"][name], atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
    for r in ranks:
        for moment, scale in (("exp_avg", 1e-6), ("exp_avg_sq", 1e-10)):
            for name, value in r["moments"][moment].items():
                torch.testing.assert_close(value, ref["moments"][moment][name], atol=scale, rtol=1e-4,
                                           msg=lambda m: f"{moment} {name}: {m}")
    # The bias step comes from the global load: identical on every rank and equal to the reference.
    assert set().union(*(r["bias"] for r in ranks)) == ref["bias"].keys()
    for r in ranks:
        for layer, bias in r["bias"].items():
            torch.testing.assert_close(bias, ref["bias"][layer], atol=0, rtol=0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tensor,pipeline,expert,world,optimizer", [
    (2, 1, 1, 2, "local"), (1, 1, 2, 2, "local"), (1, 1, 1, 2, "local"),
    pytest.param(2, 1, 2, 4, "local", marks=pytest.mark.slow),
    (1, 2, 1, 2, "local"), (1, 3, 1, 3, "local"),
    pytest.param(1, 2, 2, 4, "local", marks=pytest.mark.slow),
    (1, 1, 1, 2, "distributed"),
    pytest.param(2, 1, 2, 4, "distributed", marks=pytest.mark.slow),
    pytest.param(1, 2, 2, 4, "distributed", marks=pytest.mark.slow)],
    ids=["TP2", "EP2", "DP2", "TP2xEP2xDP2", "PP2", "PP3", "PP2xEP2xDP2",
         "ZeRO1-DP2", "ZeRO1-TP2xEP2xDP2", "ZeRO1-PP2xEP2xDP2"])
def test_one_step_matches_single_process(reference, tensor, pipeline, expert, world, optimizer):
    out, ref = reference
    for stale in out.glob("rank[1-9]*.pt"):
        stale.unlink()
    run_ranks(world, [WORKER, "step", str(out), "--tensor", str(tensor), "--pipeline", str(pipeline),
                      "--expert", str(expert), "--optimizer", optimizer])
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(world)]

    assert_step_matches(ref, ranks, torch.load(out / "state.pt"), optimizer)
    assert sum(b.abs().sum() for b in ref["bias"].values()) > 0
    if expert > 1:  # tokens really left their rank through the all-to-all
        assert all(r["sent_away"] > 0 for r in ranks)
    if pipeline > 1:  # the stages really split the layers
        assert all(len(r["grads"]) < len(ref["grads"]) for r in ranks)


@pytest.mark.slow
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


@pytest.mark.timeout(300)
def test_pipeline_activations_cross_stages_in_the_training_dtype(tmp_path):
    """Two stages, 4 micro-batches of 2 x 16 tokens: stage 0 sends each activation [s, b, h] and
    stage 1 each gradient back, in FP32, or in BF16 under train.bf16 (half the bytes)."""
    sent = {}
    for bf16 in (False, True):
        out = tmp_path / ("bf16" if bf16 else "fp32")
        out.mkdir()
        run_ranks(2, [WORKER, "pipeline_bytes", str(out)] + (["--bf16"] if bf16 else []))
        sent[bf16] = [torch.load(out / f"bytes{r}.pt") for r in range(2)]
    for rank in range(2):
        fp32, bf16 = sent[False][rank], sent[True][rank]
        assert fp32["dtypes"] == ["torch.float32"] and bf16["dtypes"] == ["torch.bfloat16"]
        assert fp32["bytes"] == fp32["tokens"] * fp32["hidden"] * 4  # every token's hidden state once
        assert bf16["bytes"] * 2 == fp32["bytes"]
