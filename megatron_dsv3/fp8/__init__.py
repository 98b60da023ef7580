"""FP8 training with 1x128 activation tiles and 128x128 weight blocks (report section 3.3)."""
from .backends import BACKENDS, describe_backend, scaled_gemm, select_backend, te_fp8_autocast
from .gemm import fp8_gemm
from .linear import Fp8Linear, apply_fp8, fp8_batched_matmul, fp8_matmul
from .quantize import (E4M3_MAX, FP8RangeError, dequantize_blocks, dequantize_tiles, quantize_blocks,
                       quantize_tensor, quantize_tiles)

__all__ = [
    "BACKENDS", "E4M3_MAX", "FP8RangeError", "Fp8Linear", "apply_fp8", "dequantize_blocks", "dequantize_tiles",
    "describe_backend", "fp8_batched_matmul", "fp8_gemm", "fp8_matmul", "quantize_blocks", "quantize_tensor",
    "quantize_tiles", "scaled_gemm", "select_backend", "te_fp8_autocast",
]
