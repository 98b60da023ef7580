"""Let transformers dequantise FP8 checkpoints whose edge blocks are partial (on a CPU).

DeepSeek's FP8 format gives every 128x128 block of a weight one scale and lets the last block
row/column be partial: DeepSeek-V3's own `kv_a_proj_with_mqa.weight` is [576, 7168] with a [5, 56]
`weight_scale_inv`. transformers 5.x (checked on 5.24) dequantises on a machine without a
suitable GPU through `Fp8Dequantize._dequantize_one`, which derives the block size as
rows // scale_rows and refuses a shape the grid does not divide ("Weight shape (320, 128) not
divisible by scale grid (3, 1)"). Inside `fp8_partial_blocks()` that method sees the weight
zero-padded to whole 128x128 blocks and returns the result cut back to the weight's shape: the
same q * s per element, the padding never reaches the model.

    with fp8_partial_blocks():
        model = DeepseekV3ForCausalLM.from_pretrained(fp8_folder)

A transformers without that method is left alone.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from megatron_dsv3.compat.active import mark, unmark

NAME = "transformers.integrations.finegrained_fp8:Fp8Dequantize-partial-blocks"
BLOCK = 128


@contextlib.contextmanager
def fp8_partial_blocks() -> Iterator[None]:
    try:
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    except ImportError:
        yield
        return
    original = getattr(Fp8Dequantize, "_dequantize_one", None)
    if original is None:
        yield
        return

    def dequantize_one(self, quantized: torch.Tensor, scales: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows, cols = quantized.shape[-2:]
        grid = tuple(scales.shape[-2:]) if scales.dim() >= 2 else (1, 1)
        padded = (grid[0] * BLOCK, grid[1] * BLOCK)
        if quantized.dtype != torch.float8_e4m3fn or (rows, cols) == padded or rows > padded[0] or cols > padded[1]:
            return original(self, quantized, scales, *args, **kwargs)
        whole = quantized.new_zeros((*quantized.shape[:-2], *padded))
        whole[..., :rows, :cols] = quantized
        return original(self, whole, scales, *args, **kwargs)[..., :rows, :cols].contiguous()

    Fp8Dequantize._dequantize_one = dequantize_one
    mark(NAME)
    try:
        yield
    finally:
        Fp8Dequantize._dequantize_one = original
        unmark(NAME)
