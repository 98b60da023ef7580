"""What the parallel-correctness tests assert of one training step (tests/helpers/parallel_worker.py
runs it): the step of parallel ranks equals the single process's, gradients, update, moments and
routing biases included."""
from __future__ import annotations

import pytest
import torch

WORKER = "tests/helpers/parallel_worker.py"
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 1e-8, 0.1  # the worker's AdamW (ours and Megatron's)


def adam_first_step(initial: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """The parameter AdamW's first step makes from `initial` and the moments it recorded; weight
    decay on matrices only, as both optimizers apply it."""
    decay = WEIGHT_DECAY if initial.dim() > 1 else 0.0
    first, second = exp_avg / (1 - BETAS[0]), exp_avg_sq / (1 - BETAS[1])
    return initial * (1 - LR * decay) - LR * first / (second.sqrt() + EPS)


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
