"""FP8 GEMM backends under one numerical contract (report section 3.3.2).

Contract: out = sum over 128-wide K chunks of (a_chunk @ b_chunk^T) * a_scale * b_scale, FP32
accumulation, a in 1x128 tiles, b in 128x128 blocks (Fprop, Dgrad) or 1x128 tiles (Wgrad).

- "emulation": `gemm.fp8_gemm`, pure PyTorch, any device; the reference.
- "torch-scaled-mm": PyTorch's blockwise scaled matmul on Hopper, found by feature
  (`blockwise_scaled_mm_apis`): `F.scaled_mm` with its 1x128 / 128x128 ScalingType members,
  and `torch._scaled_mm`, which infers blockwise scaling from the scale shapes. Each is checked
  against the emulation on a probe GEMM, in that order, and the first that matches is used;
  shapes it cannot take (a dim not a multiple of 128) use the emulation.
- "transformer-engine": TE >= 2.3. `Fp8Linear` runs through `transformer_engine.pytorch.Linear`
  (same Parameters) under `te_fp8_autocast()`, TE's Float8BlockScaling recipe; the MoE expert
  GEMMs stay on torch-scaled-mm when it passed its probe, else the emulation.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .gemm import fp8_gemm
from .quantize import TILE, quantize_blocks, quantize_tiles

log = logging.getLogger(__name__)

BACKENDS = ("emulation", "torch-scaled-mm", "transformer-engine")
_state = {"name": None, "reason": "", "scaled_mm_ok": None, "api": None}
# Rows of expert GEMMs (forward, padded per expert) and how many of them ran on a kernel.
expert_gemm_rows = {"kernel": 0, "total": 0}


@dataclass(frozen=True)
class BlockwiseScaledMM:
    """How this torch spells blockwise scaled matmul: `F.scaled_mm` + enum members, or `torch._scaled_mm`."""
    function: str  # "F.scaled_mm" or "torch._scaled_mm"
    tile_1x128: object = None  # ScalingType member for 1x128 scales (F.scaled_mm only)
    block_128x128: object = None


def _normalised(name: str) -> str:
    return name.lower().replace("_", "")


def blockwise_scaled_mm_apis(functional=torch.nn.functional, torch_module=torch) -> list[BlockwiseScaledMM]:
    """The installed torch's blockwise scaled matmuls, detected by feature, not by version; best first.

    `F.scaled_mm` when its ScalingType enum has members named like BlockWise1x128 and
    BlockWise128x128 (case and underscores ignored); then `torch._scaled_mm` if present.
    """
    found = []
    scaling_type = getattr(functional, "ScalingType", None)
    if callable(getattr(functional, "scaled_mm", None)) and scaling_type is not None:
        members = {_normalised(n): getattr(scaling_type, n) for n in dir(scaling_type) if not n.startswith("_")}
        tile, block = members.get("blockwise1x128"), members.get("blockwise128x128")
        if tile is not None and block is not None:
            found.append(BlockwiseScaledMM("F.scaled_mm", tile, block))
    if callable(getattr(torch_module, "_scaled_mm", None)):
        found.append(BlockwiseScaledMM("torch._scaled_mm"))
    return found


def blockwise_scaled_mm_api(functional=torch.nn.functional, torch_module=torch) -> BlockwiseScaledMM | None:
    """The best detected blockwise scaled matmul, or None."""
    apis = blockwise_scaled_mm_apis(functional, torch_module)
    return apis[0] if apis else None


def _te_version():
    """TE version tuple if transformer_engine.pytorch >= 2.3 imports, else None."""
    try:  # optional dependency (megatron-dsv3[te])
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


def _scaled_mm_blockwise(a_fp8, a_scales, b_fp8, b_scales, out_dtype=torch.bfloat16, api=None):
    """a [M, K] 1x128 tiles @ b [N, K]^T (128x128 blocks or 1x128 tiles) on torch's kernel.

    Scale layouts follow the op's documented checks: 1x128 scales [rows, K/128] with stride
    (1, rows) ("outer-dim-major"); 128x128 scales of b as [L4, N/128] with stride (1, L4),
    L4 = K/128 rounded up to a multiple of 4.
    """
    api = api or _state.get("api") or blockwise_scaled_mm_api()  # the one that passed the probe, if probed
    if api is None:
        raise RuntimeError("this torch has neither F.scaled_mm with blockwise ScalingType nor torch._scaled_mm")
    M, K = a_fp8.shape
    N = b_fp8.shape[0]
    sa = a_scales.float().t().contiguous().t()
    tiles_b = b_scales.shape[0] == N  # 1x128 tiles (Wgrad)
    if tiles_b:
        sb = b_scales.float().t().contiguous().t()
    else:
        L4 = -(-(K // TILE) // 4) * 4
        sb_padded = torch.ones(b_scales.shape[0], L4, dtype=torch.float32, device=b_scales.device)
        sb_padded[:, : b_scales.shape[1]] = b_scales
        sb = sb_padded.t()
    # mat_b must be column-major [K, N]: a row-major [N, K] b (Dgrad passes W^T, a strided view).
    a, b = a_fp8.contiguous(), b_fp8.contiguous().t()
    if api.function == "F.scaled_mm":
        recipe_b = api.tile_1x128 if tiles_b else api.block_128x128
        return torch.nn.functional.scaled_mm(a, b, sa, api.tile_1x128, sb, recipe_b, output_dtype=out_dtype)
    return torch._scaled_mm(a, b, sa, sb, out_dtype=out_dtype)  # blockwise inferred from scale shapes


def _probe_scaled_mm() -> tuple[bool, str]:
    """Run one 256x384x512 GEMM (both b layouts) per detected API on the GPU against the emulation.

    The first API that matches is kept in `_state["api"]`; the reason names each one that failed.
    """
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if torch.cuda.get_device_capability() != (9, 0):
        return False, f"blockwise scaled_mm needs sm_90, found sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    apis = blockwise_scaled_mm_apis()
    if not apis:
        return False, "this torch has no scaled matmul"
    g = torch.Generator(device="cuda").manual_seed(0)
    a_fp8, sa = quantize_tiles(torch.randn(256, 512, device="cuda", generator=g))
    w = torch.randn(384, 512, device="cuda", generator=g)
    failures = []
    for api in apis:
        try:
            for b_fp8, sb in (quantize_blocks(w), quantize_tiles(w)):
                ref = fp8_gemm(a_fp8, sa, b_fp8, sb)
                out = _scaled_mm_blockwise(a_fp8, sa, b_fp8, sb, api=api).float()
                rel = float((out - ref).norm() / ref.norm())
                if not rel < 1e-2:
                    raise ValueError(f"probe mismatch vs emulation (rel err {rel:.3g})")
        except Exception as exc:  # missing API, kernel or layout: try the next, and say why
            failures.append(f"{api.function}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        _state["api"] = api
        return True, "; ".join(failures + [f"{api.function} probe GEMM matches emulation"])
    return False, "; ".join(failures)


def _scaled_mm_ok() -> bool:
    if not torch.cuda.is_available():  # absent or hidden (CPU tests on a CUDA host): not cached either way
        _state["probe"] = "no CUDA device visible"
        return False
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
            if te and torch.cuda.is_available():
                name = cand
                reasons.append(f"TE {'.'.join(map(str, te))} with Float8BlockScaling")
                break
            reasons.append("transformer-engine >= 2.3 not importable" if not te else "no CUDA device for TE")
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


def gemm_uses_kernel(a_fp8: torch.Tensor, b_fp8: torch.Tensor) -> bool:
    """Whether `scaled_gemm(a, ., b, .)` runs on torch's kernel (CUDA, probe passed, dims multiples of 128)."""
    return (a_fp8.is_cuda and current_backend() != "emulation" and _scaled_mm_ok()
            and all(d % TILE == 0 for d in (*a_fp8.shape[-2:], b_fp8.shape[-2])))


def scaled_gemm(a_fp8, a_scales, b_fp8, b_scales, out_dtype=torch.float32):
    """a @ b^T under the contract above, on the selected backend; 2-D or batched [..., M, K]."""
    if not gemm_uses_kernel(a_fp8, b_fp8):
        return fp8_gemm(a_fp8, a_scales, b_fp8, b_scales, out_dtype)
    if a_fp8.dim() == 2:
        return _scaled_mm_blockwise(a_fp8, a_scales, b_fp8, b_scales).to(out_dtype)
    return torch.stack([_scaled_mm_blockwise(a, sa, b, sb).to(out_dtype)  # one call per expert
                        for a, sa, b, sb in zip(a_fp8, a_scales, b_fp8, b_scales)])


def te_fp8_autocast():
    """Context for TE layers: fp8_autocast with the Float8BlockScaling (1x128 / 128x128, E4M3) recipe."""
    if _te_version() is None:
        raise RuntimeError("te_fp8_autocast needs transformer-engine >= 2.3 (pip install 'megatron-dsv3[te]')")
    import transformer_engine.pytorch as te  # optional dependency (megatron-dsv3[te]): imported where used
    from transformer_engine.common.recipe import Float8BlockScaling, Format

    return te.fp8_autocast(enabled=True, fp8_recipe=Float8BlockScaling(fp8_format=Format.E4M3))


def te_linear_sharing(weight: torch.nn.Parameter, bias: torch.nn.Parameter | None) -> torch.nn.Module:
    """A `transformer_engine.pytorch.Linear` whose weight and bias are these Parameter objects."""
    import transformer_engine.pytorch as te  # optional dependency (megatron-dsv3[te]): imported where used

    out_features, in_features = weight.shape
    layer = te.Linear(in_features, out_features, bias=bias is not None, params_dtype=weight.dtype, device="meta")
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer
