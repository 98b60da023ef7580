"""FP8 linear layers: Fprop, Dgrad and Wgrad all in FP8 (report section 3.3.1, figure 6).

Fprop  y  = x W^T : x in 1x128 tiles along in_features, W in 128x128 blocks.
Dgrad  dx = dy W  : dy in 1x128 tiles along out_features, W^T reuses W's blocks (a 128x128
                    block grid is its own transpose, so W is not re-quantised).
Wgrad  dW = dy^T x: both operands in 1x128 tiles along the token dimension.
The activation kept for Wgrad is FP8 (section 3.3.3): x^T tiled along tokens plus its scales;
the high-precision x is not saved. Master weights stay in their own dtype. Wgrad goes through
`weight_grad_store.weight_grad`, so DualPipe's W can defer it (it then keeps x^T's FP8 tiles and dy).
NaN/Inf met by a quantiser are recorded on the device and raised, naming the GEMM operand, by
`raise_deferred_overflow()` once per step: no host sync per quantisation.
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch import nn

from megatron_dsv3.weight_grad_store import Linear, weight_grad

from .backends import (current_backend, expert_gemm_rows, gemm_uses_kernel, scaled_gemm, te_fp8_autocast,
                       te_linear_sharing)
from .quantize import TILE, quantize_blocks, quantize_tiles


class _Fp8MatmulFn(torch.autograd.Function):
    """x [..., M, K] @ w [..., N, K]^T (+ bias) with the three GEMMs in FP8; leading dims batch experts."""

    @staticmethod
    def forward(ctx, x, weight, bias, power_of_two, label):
        x_fp8, x_scales = quantize_tiles(x, power_of_two, name=f"{label} input", deferred_check=True)
        w_fp8, w_scales = quantize_blocks(weight, name=f"{label} weight", deferred_check=True)
        y = scaled_gemm(x_fp8, x_scales, w_fp8, w_scales)  # [..., M, N] FP32
        if bias is not None:
            y = y + bias.float()
        # Wgrad contracts over tokens, so cache x^T in 1x128 tiles along tokens, in FP8.
        xt_fp8, xt_scales = quantize_tiles(x.transpose(-1, -2), power_of_two, name=f"{label} input",
                                           deferred_check=True)
        ctx.save_for_backward(xt_fp8, xt_scales, w_fp8, w_scales)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.label = label
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xt_fp8, xt_scales, w_fp8, w_scales = ctx.saved_tensors  # [..., K, M], [..., K, M/128], [..., N, K], blocks
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dx = db = None
        if ctx.needs_input_grad[0]:
            # 1x128 tiles along N
            dy_fp8, dy_scales = quantize_tiles(dy, name=f"{ctx.label} output gradient", deferred_check=True)
            dx = scaled_gemm(dy_fp8, dy_scales, w_fp8.transpose(-1, -2), w_scales.transpose(-1, -2)).to(x_dtype)
        dw = weight_grad(ctx, 1, functools.partial(_wgrad, dy, xt_fp8, xt_scales, w_dtype, ctx.label),
                         dy, xt_fp8, xt_scales)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            db = dy.float().flatten(0, -2).sum(0).to(b_dtype)
        return dx, dw, db, None, None


def _wgrad(dy: torch.Tensor, xt_fp8: torch.Tensor, xt_scales: torch.Tensor, w_dtype: torch.dtype,
           label: str) -> torch.Tensor:
    """Wgrad dW = dy^T x [..., N, K], both operands in 1x128 tiles along the tokens."""
    dyt_fp8, dyt_scales = quantize_tiles(dy.transpose(-1, -2), name=f"{label} output gradient", deferred_check=True)
    return scaled_gemm(dyt_fp8, dyt_scales, xt_fp8, xt_scales).to(w_dtype)


def fp8_matmul(x_MK: torch.Tensor, w_NK: torch.Tensor, bias: torch.Tensor | None = None,
               power_of_two: bool = False, label: str = "fp8_matmul") -> torch.Tensor:
    """x @ w^T (+ bias) for 2-D x [M, K], w [N, K], differentiable, all GEMMs FP8."""
    return _Fp8MatmulFn.apply(x_MK, w_NK, bias, power_of_two, label)


class ExpertFp8Matmul:
    """FP8 GEMMs of the MoE experts: `grouped` takes each expert's rows padded to a multiple of
    `row_multiple`, so every expert's Fprop, Dgrad and Wgrad (1x128 tiles along tokens) is a
    kernel-sized 2-D GEMM."""
    row_multiple = TILE

    def grouped(self, x_MK: torch.Tensor, w_ENK: torch.Tensor, rows_E: list[int],
                label: str = "routed experts") -> torch.Tensor:
        """x [sum(rows_E), K], expert e's rows in block e (each a multiple of 128) -> [sum(rows_E), N]."""
        outs = []
        for e, x_e in enumerate(x_MK.split(rows_E)):
            if rows_E[e] == 0:
                outs.append(x_e.new_zeros(0, w_ENK.shape[1]))
                continue
            expert_gemm_rows["total"] += rows_E[e]
            expert_gemm_rows["kernel"] += rows_E[e] if gemm_uses_kernel(x_e, w_ENK[e]) else 0
            outs.append(_Fp8MatmulFn.apply(x_e, w_ENK[e], None, False, f"{label} (expert {e})"))
        return torch.cat(outs)


fp8_batched_matmul = ExpertFp8Matmul()


class Fp8Linear(Linear):
    """Drop-in nn.Linear whose three GEMMs run in FP8 with tile/block scaling.

    power_of_two: round activation scales up to powers of two (the report does this for the
    inputs of the linear after attention, section 3.3.3; TE's recipe sets its own scales).
    label: names this layer in FP8 overflow errors (`apply_fp8` sets the module's dotted name).
    On the "transformer-engine" backend the GEMMs run in a TE Linear holding the same Parameters
    (not registered as a submodule, so parameters and state_dict keys stay this module's).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 power_of_two: bool = False, label: str = "Fp8Linear"):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.power_of_two, self.label = power_of_two, label

    @classmethod
    def from_linear(cls, linear: nn.Linear, power_of_two: bool = False, label: str = "Fp8Linear") -> "Fp8Linear":
        """Wrap an existing nn.Linear, sharing its Parameter objects (no copy, no re-init)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.power_of_two, new.label = power_of_two, label
        new.train(linear.training)
        return new

    def _te_linear(self) -> nn.Module:
        te_linear = self.__dict__.get("_te_linear_cache")
        if te_linear is None or te_linear.weight is not self.weight:  # built once; again if the weight was replaced
            te_linear = self.__dict__["_te_linear_cache"] = te_linear_sharing(self.weight, self.bias)
        return te_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if current_backend() == "transformer-engine":
            with te_fp8_autocast():
                return self._te_linear()(x)
        y_MN = _Fp8MatmulFn.apply(x.reshape(-1, self.in_features), self.weight, self.bias, self.power_of_two,
                                  self.label)
        return y_MN.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=1x128/128x128, power_of_two={self.power_of_two}"


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """A skip entry matches a dotted name component that equals or ends with it.

    So `mlp.gate` (MoE gating) and `q_a_layernorm` are skipped while `mlp.gate_proj`, an FFN
    GEMM that the report runs in FP8, is not.
    """
    parts = name.split(".")
    return any(p == s or p.endswith(s) for s in skip for p in parts)


def apply_fp8(model: nn.Module, skip: Iterable[str] = ("embed_tokens", "lm_head", "embedding", "output_layer", "router", "gate", "norm"),
              power_of_two: Iterable[str] = ("linear_proj", "o_proj")) -> list[str]:
    """Swap nn.Linear submodules for Fp8Linear in place (report section 3.3.1); returns their names.

    Embedding, output head (ours: embed_tokens/lm_head; Megatron-Core's: embedding/output_layer),
    MoE gating and norms stay in higher precision. Parameters are the
    same objects, so optimizer state and state_dict keys are unchanged. Linears named in
    `power_of_two` (the projection after attention) get power-of-two activation scales.
    """
    skip, power_of_two = tuple(skip), tuple(power_of_two)
    targets = [(name, mod) for name, mod in model.named_modules()
               if name and isinstance(mod, nn.Linear) and not isinstance(mod, Fp8Linear) and not _skipped(name, skip)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_linear(mod, power_of_two=_skipped(name, power_of_two), label=name))
    return [name for name, _ in targets]
