"""Tile/block-scaled FP8 GEMM, reference emulation (report section 3.3.2, "increasing accumulation precision").

On H800 the tensor cores accumulate an FP8 MMA in limited precision; DeepSeek promotes the
partial result to FP32 CUDA cores every N_C = 128 elements of K and applies the tile and
block scales there. The emulation keeps that structure: one FP32 partial product per 128-wide
K chunk, scaled by a_scale * b_scale, added into an FP32 accumulator. It does not model the
tensor cores' reduced precision inside a chunk (each chunk is an exact-ish FP32 matmul).
"""
from __future__ import annotations

import torch

from .quantize import TILE


def _row_scales(scales: torch.Tensor, rows: int) -> torch.Tensor:
    """Scales of b as one row per output row: [..., rows, K/128].

    1x128 tile scales already have `rows` rows; 128x128 block scales have ceil(rows/128) and are
    repeated. (For rows <= 1 both layouts coincide.)
    """
    if scales.shape[-2] == rows:
        return scales
    return scales.repeat_interleave(TILE, dim=-2)[..., :rows, :]


def fp8_gemm(a_fp8: torch.Tensor, a_scales: torch.Tensor, b_fp8: torch.Tensor, b_scales: torch.Tensor,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b^T with FP32 promotion every 128 elements of K.

    Args:
        a_fp8: [..., M, K] float8, 1x128 tiles along K; a_scales [..., M, ceil(K/128)].
        b_fp8: [..., N, K] float8, either 128x128 blocks (b_scales [..., ceil(N/128), ceil(K/128)])
            or 1x128 tiles along K (b_scales [..., N, ceil(K/128)]), as Wgrad needs.
    Returns:
        [..., M, N] in out_dtype.
    """
    M, K = a_fp8.shape[-2:]
    N = b_fp8.shape[-2]
    if b_fp8.shape[-1] != K:
        raise ValueError(f"fp8_gemm: K mismatch, a {tuple(a_fp8.shape)} vs b {tuple(b_fp8.shape)}")
    sb_NC = _row_scales(b_scales, N)  # [..., N, K/128]
    batch = torch.broadcast_shapes(a_fp8.shape[:-2], b_fp8.shape[:-2])
    acc_MN = torch.zeros(*batch, M, N, dtype=torch.float32, device=a_fp8.device)
    with torch.autocast(a_fp8.device.type, enabled=False):  # BF16 autocast would round the FP32 partials
        for c, k0 in enumerate(range(0, K, TILE)):
            a_chunk = a_fp8[..., k0:k0 + TILE].float()  # [..., M, <=128]
            b_chunk = b_fp8[..., k0:k0 + TILE].float()  # [..., N, <=128]
            partial_MN = a_chunk @ b_chunk.transpose(-1, -2)
            acc_MN += partial_MN * a_scales[..., :, c, None] * sb_NC[..., None, :, c]
    return acc_MN.to(out_dtype)
