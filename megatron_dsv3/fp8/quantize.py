"""Fine-grained FP8 quantisation (report section 3.3.2): 1x128 activation tiles, 128x128 weight blocks.

Online scaling from the current values only: scale = max(amax, 1e-4) / 448, q = x / scale in
E4M3, dequantised as q * scale. Scales are FP32 and stored one per tile / block, like the
`weight_scale_inv` tensors of DeepSeek's FP8 checkpoints.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
AMAX_FLOOR = 1e-4


class FP8RangeError(ValueError):
    """A tensor to be quantised holds NaN or Inf; the message names it and counts the bad values."""


def _check_finite(x: torch.Tensor, name: str) -> None:
    """Immediate check (one host sync): for quantising outside the training hot path."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise FP8RangeError(f"{name}: {bad} non-finite value(s) (NaN/Inf) out of {x.numel()}; refusing to cast to FP8")


# Deferred check for the hot path: per (name, device), a device-side count of scales that came out
# NaN/Inf. A tile's or block's amax is NaN/Inf exactly when it holds one, so counting the scales
# needs no extra pass over the data and no host sync; `raise_deferred_overflow` syncs once a step.
_pending_nonfinite: dict[tuple[str, torch.device], torch.Tensor] = {}


def _record_nonfinite_scales(scales: torch.Tensor, name: str) -> None:
    key = (name, scales.device)
    bad = (~torch.isfinite(scales.detach())).sum()
    _pending_nonfinite[key] = bad if key not in _pending_nonfinite else _pending_nonfinite[key] + bad


def raise_deferred_overflow() -> None:
    """Raise FP8RangeError naming every tensor that held NaN/Inf since the last call; then reset.

    One host sync. dsv3-train calls it when a step's loss or gradient norm is NaN/Inf (which an
    FP8 operand holding NaN/Inf always causes), so a healthy step pays nothing.
    """
    if not _pending_nonfinite:
        return
    names = list(_pending_nonfinite)
    counts = torch.stack([_pending_nonfinite[k].to(names[0][1]) for k in names]).tolist()
    _pending_nonfinite.clear()
    bad = [f"{name} ({count} tile(s)/block(s))" for (name, _), count in zip(names, counts) if count]
    if bad:
        raise FP8RangeError(f"NaN/Inf reached FP8 quantisation in: {', '.join(bad)}; refusing to train on it")


def _check_scales(x: torch.Tensor, scales: torch.Tensor, name: str, deferred: bool) -> None:
    if deferred:
        _record_nonfinite_scales(scales, name)
    else:
        _check_finite(x, name)


def _scale_from_amax(amax: torch.Tensor, power_of_two: bool) -> torch.Tensor:
    scale = amax.float().clamp(min=AMAX_FLOOR) / E4M3_MAX
    if power_of_two:  # round up so that x / scale still fits in [-448, 448]
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - dim % x.dim() - 1) + [0, extra]
    return F.pad(x, pad)


def quantize_tiles(x: torch.Tensor, power_of_two: bool = False, name: str = "activation", deferred_check: bool = False):
    """Quantise x [..., K] in 1x128 tiles along K.

    NaN/Inf raise FP8RangeError naming `name`: at once, or with `deferred_check` at the next
    `raise_deferred_overflow()` (no host sync here).
    Returns (x_fp8 [..., K] float8_e4m3fn, scales [..., ceil(K/128)] float32).
    """
    K = x.shape[-1]
    x_tiles = _pad_to(x.float().contiguous(), -1, TILE).unflatten(-1, (-1, TILE))  # [..., K/128, 128]
    scales = _scale_from_amax(x_tiles.abs().amax(dim=-1), power_of_two)  # [..., K/128]
    _check_scales(x, scales, name, deferred_check)
    q = _to_fp8(x_tiles, scales.unsqueeze(-1)).flatten(-2)[..., :K]
    return q, scales


def dequantize_tiles(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_tiles`: q * s, FP32 [..., K]."""
    K = x_fp8.shape[-1]
    s = scales.repeat_interleave(TILE, dim=-1)[..., :K]
    return x_fp8.float() * s


def quantize_blocks(w: torch.Tensor, power_of_two: bool = False, name: str = "weight", deferred_check: bool = False):
    """Quantise w [..., N, K] (2-D weight or [E, N, K] expert weights) in 128x128 blocks.

    NaN/Inf are reported as in `quantize_tiles`.
    Returns (w_fp8 same shape float8_e4m3fn, scales [..., ceil(N/128), ceil(K/128)] float32).
    """
    if w.dim() < 2:
        raise ValueError(f"{name}: quantize_blocks needs a [..., N, K] tensor, got shape {tuple(w.shape)}")
    N, K = w.shape[-2:]
    wp = _pad_to(_pad_to(w.float(), -1, TILE), -2, TILE)
    blocks = wp.unflatten(-1, (-1, TILE)).unflatten(-3, (-1, TILE))  # [..., N/128, 128, K/128, 128]
    scales = _scale_from_amax(blocks.abs().amax(dim=(-3, -1)), power_of_two)  # [..., N/128, K/128]
    _check_scales(w, scales, name, deferred_check)
    q = _to_fp8(blocks, scales[..., :, None, :, None]).flatten(-2).flatten(-3, -2)
    return q[..., :N, :K], scales


def expand_block_scales(scales: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Block scales [..., N/128, K/128] -> one scale per element [..., N, K]."""
    return scales.repeat_interleave(TILE, dim=-2).repeat_interleave(TILE, dim=-1)[..., :N, :K]


def dequantize_blocks(w_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_blocks`: q * s, FP32 [..., N, K]."""
    N, K = w_fp8.shape[-2:]
    return w_fp8.float() * expand_block_scales(scales, N, K)


def quantize_tensor(x: torch.Tensor, name: str = "tensor"):
    """Per-tensor (delayed-scaling style, one amax) baseline; returns (x_fp8, scale []) float32."""
    _check_finite(x, name)
    scale = _scale_from_amax(x.abs().amax(), False)
    return _to_fp8(x.float(), scale), scale


def num_tiles(k: int) -> int:
    return math.ceil(k / TILE)
