"""Run code written for CUDA on the `meta` device, which stands for the GPU in a rehearsal
(`megatron_dsv3.rehearse`): a scoped, undoable set of shims, as `megatron_cpu.cpu_shims` is for
the CPU.

    with meta_shims():
        torch.zeros(4, device="cuda").device        # meta
        with torch.autocast("meta", dtype=torch.bfloat16):
            (x_fp32 @ w_fp32).dtype                  # bfloat16, as CUDA's autocast gives

Meta tensors carry shapes and dtypes, not data; backward runs on them. Shims (what
`megatron_dsv3.compat.applied()` lists while active):
  torch.cuda.current_device        -> torch.device("meta") (Megatron-Core sizes its DDP buffers there)
  torch.cuda.synchronize           -> no-op
  cpu-rng-tracker                  -> megatron_cpu's, for Megatron's RNG regions
  cuda-factory-redirect:meta       -> device="cuda" in factories, Tensor.cuda(), .to("cuda") land on meta;
                                      and torch.autocast("meta") with CUDA's policy (below)
  torch.distributed.new_group:gloo -> the default backend: Megatron-Core asks for gloo groups, which
                                      cannot start on torch's fake store; the fake group serves both
                                      and scaled_dot_product_attention as a fused kernel (not meta's
                                      math path, which keeps the attention probabilities)
  param_and_grad_buffer:_coalescing_manager -> Megatron's DDP issues its bucket collectives one by
                                      one (the coalesced c10d ops have no meta kernel)
  clip_grads:l2_norm_impl          -> the gradient norm on the device, as TE's or apex's kernel computes
                                      it (Megatron's fallback without them reads every norm on the host)
  fp8-kernel-on-meta               -> FP8 GEMMs whose dims are multiples of 128 take torch's blockwise
                                      scaled_mm (`fp8.backends`), the path an H800 takes; its probe
                                      needs a GPU
Autocast: torch has none for meta. `torch.autocast("meta", ...)` here casts as CUDA's does
(aten/src/ATen/autocast_mode.cpp, its CUDA lists): the inputs of GEMM-like calls to the autocast
dtype (leaf weights' casts cached until the outermost region ends), and lower-precision inputs of
its float32 list to FP32. It works on the torch functions the code calls, so a GEMM inside a
composite (einsum) is not cast; checkpoint's recomputation re-enters it like CUDA's.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_dsv3.compat.active import ShimSet
from megatron_dsv3.fp8 import backends
from megatron_dsv3.compat.megatron_cpu import (CUDARedirectMode, _shim_cuda_factories, _shim_current_device,
                                               _shim_rng_tracker, _shim_synchronize)

META = torch.device("meta")

# CUDA's autocast lists (aten/src/ATen/autocast_mode.cpp: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE), by the names the code calls: run in the autocast dtype / in FP32
# (the last group only when no dtype is given).
LOWER_PRECISION = ("matmul", "__matmul__", "__rmatmul__", "einsum", "mm", "mv", "vecdot", "linear", "addmm", "addmv",
                   "addr", "addbmm", "baddbmm", "bmm", "chain_matmul", "multi_dot", "prelu",
                   "scaled_dot_product_attention")
FLOAT32 = ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
           "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm", "norm",
           "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "cross_entropy",
           "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
           "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
           "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp")
FLOAT32_UNLESS_DTYPE = ("prod", "softmax", "log_softmax", "cumprod", "cumsum", "vector_norm", "matrix_norm", "sum")


def _functions(names: tuple[str, ...]) -> set:
    found = set()
    for name in names:
        for namespace in (torch, torch.Tensor, F, torch.linalg, torch._C._nn):
            function = getattr(namespace, name, None)
            if callable(function):
                found.add(function)
    return found


class _AutocastState(threading.local):
    def __init__(self):
        self.stack: list[tuple[bool, torch.dtype]] = []
        self.cache: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self.mode: Optional["MetaMode"] = None  # the shims' mode, while they are active


class MetaAutocast:
    """`torch.autocast("meta", ...)`: a region in which `MetaMode` casts as CUDA's autocast does.

    A torch function mode is off while its handler runs, and `Tensor.backward` is such a call: the
    region that checkpoint's recomputation opens inside backward turns the mode back on."""

    state = _AutocastState()

    def __init__(self, dtype: Optional[torch.dtype] = None, enabled: bool = True, cache_enabled: Optional[bool] = None):
        self.dtype, self.enabled = dtype or torch.bfloat16, enabled
        self.pushed: Optional[MetaMode] = None

    def __enter__(self):
        mode = self.state.mode
        if mode is not None and not any(m is mode for m in torch.overrides._get_current_function_mode_stack()):
            self.pushed = mode.__enter__()
        self.state.stack.append((self.enabled, self.dtype))
        return self

    def __exit__(self, *exc) -> None:
        self.state.stack.pop()
        if not self.state.stack:
            self.state.cache.clear()
        if self.pushed is not None:
            self.pushed.__exit__(None, None, None)
            self.pushed = None

    @classmethod
    def current(cls) -> tuple[bool, torch.dtype]:
        return cls.state.stack[-1] if cls.state.stack else (False, torch.bfloat16)


class MetaMode(CUDARedirectMode):
    """CUDA placements land on meta; calls of autocast's lists cast their meta inputs."""

    lower, float32, float32_unless_dtype = _functions(LOWER_PRECISION), _functions(FLOAT32), _functions(
        FLOAT32_UNLESS_DTYPE)

    def __init__(self):
        super().__init__("meta")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        enabled, dtype = MetaAutocast.current()
        if enabled:
            kwargs = kwargs or {}
            if func in self.lower:
                args, kwargs = _cast_tree((args, kwargs), dtype, cache=True)
            elif func in self.float32 or (func in self.float32_unless_dtype and kwargs.get("dtype") is None):
                args, kwargs = _cast_tree((args, kwargs), torch.float32, cache=False)
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            return _fused_attention(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA on meta as a GPU (and the CPU) runs it: a fused kernel keeping the output and the
    log-sum-exp per query for backward. Meta's own SDPA is the math path, which would keep the
    [batch, heads, seq, seq] probabilities. The fused op's meta kernel serves both devices' sizes."""
    if enable_gqa:
        raise NotImplementedError("meta_shims: grouped-query SDPA has no fused stand-in on meta")
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def _cast(tensor: torch.Tensor, dtype: torch.dtype, cache: bool) -> torch.Tensor:
    """CUDA autocast's `cached_cast`: floating meta tensors to `dtype` (only lower precision ones to
    FP32); a leaf weight's cast is kept for the rest of the outermost autocast region."""
    if not (tensor.is_meta and tensor.is_floating_point()) or tensor.dtype == dtype or tensor.dtype == torch.float64:
        return tensor
    if dtype == torch.float32 and tensor.element_size() >= 4:
        return tensor
    if not (cache and tensor.is_leaf and tensor.requires_grad):
        return tensor.to(dtype)
    entry = MetaAutocast.state.cache.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        entry = (weakref.ref(tensor), tensor.to(dtype))
        MetaAutocast.state.cache[id(tensor)] = entry
    return entry[1]


def _cast_tree(value: Any, dtype: torch.dtype, cache: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return _cast(value, dtype, cache)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_tree(v, dtype, cache) for v in value)
    if isinstance(value, dict):
        return {k: _cast_tree(v, dtype, cache) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- shims
def _shim_factories_and_autocast() -> Callable[[], None]:
    # torch.autocast / torch.amp.autocast refuse device_type "meta"; checkpoint's recomputation
    # asks torch.amp.is_autocast_available, is_autocast_enabled and get_autocast_dtype for it.
    original = (torch.autocast, torch.amp.autocast, torch.amp.is_autocast_available, torch.is_autocast_enabled,
                torch.get_autocast_dtype)
    autocast_class, is_available, is_enabled, get_dtype = original[0], original[2], original[3], original[4]

    def autocast(device_type: str, *args, **kwargs):
        return MetaAutocast(*args, **kwargs) if device_type == "meta" else autocast_class(device_type, *args, **kwargs)

    torch.autocast = torch.amp.autocast = autocast
    torch.amp.is_autocast_available = lambda device_type: device_type == "meta" or is_available(device_type)
    torch.is_autocast_enabled = lambda *device: (MetaAutocast.current()[0] if device == ("meta",)
                                                 else is_enabled(*device))
    torch.get_autocast_dtype = lambda device_type: (MetaAutocast.current()[1] if device_type == "meta"
                                                    else get_dtype(device_type))
    MetaAutocast.state.mode = mode = MetaMode()
    undo_mode = _shim_cuda_factories(mode)

    def undo() -> None:
        MetaAutocast.state.mode = None
        undo_mode()
        (torch.autocast, torch.amp.autocast, torch.amp.is_autocast_available, torch.is_autocast_enabled,
         torch.get_autocast_dtype) = original

    return undo


def _shim_gloo_groups() -> Callable[[], None]:
    # megatron/core/parallel_state.py initialize_model_parallel creates gloo groups
    # (create_gloo_process_groups) and parallel/groups.py its host-side world group; ProcessGroupGloo
    # cannot start on a FakeStore.
    original = dist.new_group

    def new_group(*args, **kwargs):
        if kwargs.get("backend") == "gloo":
            kwargs["backend"] = None
        return original(*args, **kwargs)

    dist.new_group = new_group

    def undo() -> None:
        dist.new_group = original

    return undo


class _Issued:
    """What `_coalescing_manager` yields, for collectives issued one by one: nothing left to wait for."""

    def wait(self) -> None:
        pass


@contextlib.contextmanager
def _one_by_one(group=None, device=None, async_ops: bool = False):
    yield _Issued()


def _shim_coalescing() -> Callable[[], None]:
    # megatron/core/distributed/param_and_grad_buffer.py (start_grad_sync, start_param_sync) batches
    # each bucket group's reduce-scatters / all-gathers with torch.distributed._coalescing_manager,
    # whose c10d ops (reduce_scatter_tensor_coalesced_, allgather_into_tensor_coalesced_) have no
    # meta kernel; issued one by one they move the same buffers.
    from megatron.core.distributed import param_and_grad_buffer  # Megatron-Core: imported by the shim that patches it

    original = param_and_grad_buffer._coalescing_manager
    param_and_grad_buffer._coalescing_manager = _one_by_one

    def undo() -> None:
        param_and_grad_buffer._coalescing_manager = original

    return undo


def _device_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """apex's multi_tensor_l2norm (a kernel on the GPU), on the device: the norm of the norms."""
    norms = torch.stack([torch.linalg.vector_norm(t) for tensors in tensor_lists for t in tensors])
    return torch.linalg.vector_norm(norms).float().view(1), None


def _shim_l2_norm() -> Callable[[], None]:
    # megatron/core/optimizer/clip_grads.py without Transformer Engine or apex falls back on
    # utils.local_multi_tensor_l2_norm, whose torch.tensor(list of device norms) reads each one on
    # the host (a meta tensor has none to read); the GPU run's TE/apex kernel stays on the device.
    from megatron.core.optimizer import clip_grads  # Megatron-Core: imported by the shim that patches it

    original = clip_grads.l2_norm_impl
    clip_grads.l2_norm_impl = _device_l2_norm

    def undo() -> None:
        clip_grads.l2_norm_impl = original

    return undo


def _shim_fp8_kernel() -> Callable[[], None]:
    # megatron_dsv3/fp8/backends.py gemm_uses_kernel asks for a CUDA tensor and a probe GEMM run
    # on the GPU; on meta the emulation would run (its FP32 chunk products are not the kernel's).
    original = backends.gemm_uses_kernel

    def gemm_uses_kernel(a_fp8: torch.Tensor, b_fp8: torch.Tensor) -> bool:
        if a_fp8.is_meta:
            return all(d % backends.TILE == 0 for d in (*a_fp8.shape[-2:], b_fp8.shape[-2]))
        return original(a_fp8, b_fp8)

    backends.gemm_uses_kernel = gemm_uses_kernel

    def undo() -> None:
        backends.gemm_uses_kernel = original

    return undo


_SHIMS: list[tuple[str, Callable[[], Callable[[], None]]]] = [
    ("torch.cuda.current_device:meta", lambda: _shim_current_device("meta")),
    ("torch.cuda.synchronize", _shim_synchronize),
    ("megatron.core.tensor_parallel.random:cpu-rng-tracker", _shim_rng_tracker),
    ("torch:cuda-factory-redirect:meta", _shim_factories_and_autocast),
    ("torch.distributed.new_group:gloo", _shim_gloo_groups),
    ("megatron.core.distributed.param_and_grad_buffer:_coalescing_manager", _shim_coalescing),
    ("megatron.core.optimizer.clip_grads:l2_norm_impl", _shim_l2_norm),
    ("megatron_dsv3.fp8:fp8-kernel-on-meta", _shim_fp8_kernel),
]


# ------------------------------------------------------------------------------ API
_SET = ShimSet(_SHIMS)
apply = _SET.apply  # activate the shims (with or without CUDA); returns the names this call activated
undo = _SET.undo  # deactivate what the matching apply() activated
active = _SET.active
meta_shims = _SET.scope  # apply() ... undo() as a context manager
