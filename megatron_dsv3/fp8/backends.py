"""FP8 GEMM backends under one numerical contract (report section 3.3.2).

Contract: out = sum over 128-wide K chunks of (a_chunk @ b_chunk^T) * a_scale * b_scale, FP32
accumulation, a in 1x128 tiles, b in 128x128 blocks (Fprop, Dgrad) or 1x128 tiles (Wgrad).

- "emulation": `gemm.fp8_gemm`, pure PyTorch, any device; the reference.
- "torch-scaled-mm": `torch.nn.functional.scaled_mm` with BlockWise1x128 / BlockWise128x128
  recipes (Hopper, torch >= 2.10). Checked once against the emulation on a probe GEMM before
  it is selected; shapes it cannot take (a dim not a multiple of 128) use the emulation.
- "transformer-engine": TE >= 2.3. TE's own layers run under `te_fp8_autocast()` with the
  Float8BlockScaling recipe; `Fp8Linear` GEMMs in this package then use torch-scaled-mm
  when it passed its probe, else the emulation.
"""
from __future__ import annotations

import logging
import os

import torch

from .gemm import fp8_gemm
from .quantize import TILE

log = logging.getLogger(__name__)

BACKENDS = ("emulation", "torch-scaled-mm", "transformer-engine")
_state = {"name": None, "reason": "", "scaled_mm_ok": None}


def _te_version():
    """TE version tuple if transformer_engine.pytorch >= 2.3 imports, else None."""
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return None
    parts = str(getattr(transformer_engine, "__version__", "0")).split(".")[:2]
    try:
        version = tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)
    except ValueError:
        return None
    return version if version >= (2, 3) else None


def _scaled_mm_blockwise(a_fp8, a_scales, b_fp8, b_scales, out_dtype=torch.bfloat16):
    """a [M, K] 1x128 tiles @ b [N, K]^T (128x128 blocks or 1x128 tiles) via F.scaled_mm.

    Scale layouts follow the op's documented checks: 1x128 scales [rows, K/128] with stride
    (1, rows) ("outer-dim-major"); 128x128 scales of b as [L4, N/128] with stride (1, L4),
    L4 = K/128 rounded up to a multiple of 4.
    """
    from torch.nn.functional import ScalingType, scaled_mm

    M, K = a_fp8.shape
    N = b_fp8.shape[0]
    sa = a_scales.float().t().contiguous().t()
    if b_scales.shape[0] == N:  # 1x128 tiles (Wgrad)
        sb, recipe_b = b_scales.float().t().contiguous().t(), ScalingType.BlockWise1x128
    else:
        L4 = -(-(K // TILE) // 4) * 4
        sb_padded = torch.ones(b_scales.shape[0], L4, dtype=torch.float32, device=b_scales.device)
        sb_padded[:, : b_scales.shape[1]] = b_scales
        sb, recipe_b = sb_padded.t(), ScalingType.BlockWise128x128
    # mat_b must be column-major [K, N]: a row-major [N, K] b (Dgrad passes W^T, a strided view).
    return scaled_mm(a_fp8.contiguous(), b_fp8.contiguous().t(), sa, ScalingType.BlockWise1x128, sb, recipe_b, output_dtype=out_dtype)


def _probe_scaled_mm() -> tuple[bool, str]:
    """Run one 256x384x512 GEMM (both b layouts) on the GPU and compare with the emulation."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if torch.cuda.get_device_capability() != (9, 0):
        return False, f"blockwise scaled_mm needs sm_90, found sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    try:
        from torch.nn.functional import ScalingType, scaled_mm  # noqa: F401
        from .quantize import quantize_blocks, quantize_tiles

        g = torch.Generator(device="cuda").manual_seed(0)
        a_fp8, sa = quantize_tiles(torch.randn(256, 512, device="cuda", generator=g))
        w = torch.randn(384, 512, device="cuda", generator=g)
        for b_fp8, sb in (quantize_blocks(w), quantize_tiles(w)):
            ref = fp8_gemm(a_fp8, sa, b_fp8, sb)
            out = _scaled_mm_blockwise(a_fp8, sa, b_fp8, sb).float()
            rel = float((out - ref).norm() / ref.norm())
            if not rel < 1e-2:
                return False, f"probe mismatch vs emulation (rel err {rel:.3g})"
    except Exception as exc:  # missing API or kernel: fall back, and say why
        return False, f"scaled_mm unavailable: {type(exc).__name__}: {str(exc)[:160]}"
    return True, "probe GEMM matches emulation"


def _scaled_mm_ok() -> bool:
    if _state["scaled_mm_ok"] is None:
        _state["scaled_mm_ok"], _state["probe"] = _probe_scaled_mm()
    return _state["scaled_mm_ok"]


def select_backend(prefer: str | None = None) -> str:
    """Pick a backend (prefer, else $DSV3_FP8_BACKEND, else the best available) and log it."""
    prefer = prefer or os.environ.get("DSV3_FP8_BACKEND") or None
    if prefer is not None and prefer not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {prefer!r}; choose from {BACKENDS}")
    te = _te_version()
    order = [prefer] if prefer else ["transformer-engine", "torch-scaled-mm"]
    name, reasons = "emulation", []
    for cand in order:
        if cand == "transformer-engine":
            if te:
                name = cand
                reasons.append(f"TE {'.'.join(map(str, te))} with Float8BlockScaling")
                break
            reasons.append("transformer-engine >= 2.3 not importable")
        elif cand == "torch-scaled-mm":
            if _scaled_mm_ok():
                name = cand
                reasons.append(_state["probe"])
                break
            reasons.append(_state["probe"])
    _state["name"], _state["reason"] = name, "; ".join(reasons) or "requested"
    log.info(describe_backend())
    return name


def current_backend() -> str:
    return _state["name"] or select_backend()


def describe_backend() -> str:
    """One start-up line: the backend and why it was chosen."""
    name = current_backend()
    return f"FP8 backend: {name} (1x128 activation tiles, 128x128 weight blocks, E4M3; {_state['reason']})"


def scaled_gemm(a_fp8, a_scales, b_fp8, b_scales, out_dtype=torch.float32):
    """a @ b^T under the contract above, on the selected backend; 2-D or batched [..., M, K]."""
    use_kernel = (a_fp8.is_cuda and current_backend() != "emulation" and _scaled_mm_ok()
                  and all(d % TILE == 0 for d in (*a_fp8.shape[-2:], b_fp8.shape[-2])))
    if not use_kernel:
        return fp8_gemm(a_fp8, a_scales, b_fp8, b_scales, out_dtype)
    if a_fp8.dim() == 2:
        return _scaled_mm_blockwise(a_fp8, a_scales, b_fp8, b_scales).to(out_dtype)
    return torch.stack([_scaled_mm_blockwise(a, sa, b, sb).to(out_dtype)  # one call per expert
                        for a, sa, b, sb in zip(a_fp8, a_scales, b_fp8, b_scales)])


def te_fp8_autocast():
    """Context for TE layers: fp8_autocast with the Float8BlockScaling (1x128 / 128x128) recipe."""
    if _te_version() is None:
        raise RuntimeError("te_fp8_autocast needs transformer-engine >= 2.3 (pip install 'megatron-dsv3[te]')")
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import Float8BlockScaling

    return te.fp8_autocast(enabled=True, fp8_recipe=Float8BlockScaling())
