"""Rotary embedding on interleaved pairs, with YaRN context extension (report section 4.3)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_dsv3.config import YarnConfig


def _correction_dim(rotations: float, dim: int, base: float, context: int) -> float:
    """The rotary dimension whose wavelength fits `rotations` times in `context` tokens."""
    return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(dim: int, base: float, yarn: Optional[YarnConfig] = None) -> torch.Tensor:
    """Inverse frequencies [dim/2]. YaRN blends interpolated (/factor) and original frequencies
    with a linear ramp between the correction dimensions of beta_fast and beta_slow."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if yarn is None or yarn.factor <= 1:
        return inv_freq.float()
    context = yarn.original_max_position_embeddings
    low = max(math.floor(_correction_dim(yarn.beta_fast, dim, base, context)), 0)
    high = min(math.ceil(_correction_dim(yarn.beta_slow, dim, base, context)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp  # 1 for high-frequency dims (extrapolate), 0 for low ones (interpolate)
    inv_freq = inv_freq / yarn.factor * (1 - keep_original) + inv_freq * keep_original
    return inv_freq.float()


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, dim: int, base: float, yarn: Optional[YarnConfig] = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(dim, base, yarn), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [seq] -> (cos, sin), each [seq, dim/2] in FP32."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1), (x2, x3), ... of x [batch, seq, heads, dim]."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [b, s, h, dim/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
