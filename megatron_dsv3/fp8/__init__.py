"""FP8 training with 1x128 activation tiles and 128x128 weight blocks (report section 3.3)."""
from .backends import (BACKENDS, blockwise_scaled_mm_api, describe_backend, expert_gemm_rows, scaled_gemm,
                       select_backend, te_fp8_autocast)
from .gemm import fp8_gemm
from .linear import ExpertFp8Matmul, Fp8Linear, apply_fp8, fp8_batched_matmul, fp8_matmul
from .quantize import (E4M3_MAX, FP8RangeError, dequantize_blocks, dequantize_tiles, quantize_blocks,
                       quantize_tensor, quantize_tiles, raise_deferred_overflow)

__all__ = [
    "BACKENDS", "E4M3_MAX", "ExpertFp8Matmul", "FP8RangeError", "Fp8Linear", "apply_fp8", "blockwise_scaled_mm_api",
    "dequantize_blocks", "dequantize_tiles", "describe_backend", "expert_gemm_rows", "fp8_batched_matmul", "fp8_gemm",
    "fp8_matmul", "quantize_blocks", "quantize_tensor", "quantize_tiles", "raise_deferred_overflow", "scaled_gemm",
    "select_backend", "te_fp8_autocast",
]
