"""Run Megatron-Core (0.16-0.19) on a machine without CUDA: a scoped set of shims.

    with cpu_shims():
        parallel_state.initialize_model_parallel()
        model = GPTModel(config, transformer_layer_spec=..., ...)   # config.use_cpu_initialization=True
        forward_backward_no_pipelining(...)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)

or `apply()` ... `undo()` around a training loop. When `torch.cuda.is_available()` is True both
are no-ops, so the same code runs unchanged on GPUs. Entering twice (nested) is allowed; only
the outermost exit restores. Each shim names the Megatron-Core code it works around; all were
seen failing on megatron-core 0.16.1 with torch 2.13 (CPU build), and the same calls are present
in 0.17-0.19.

Shims (what `megatron_dsv3.compat.applied()` lists while active):
  torch.cuda.current_device     -> torch.device("cpu")
  torch.cuda.synchronize        -> no-op
  cpu-rng-tracker               -> Megatron's model-parallel RNG tracker backed by CPU generator states
  cuda-factory-redirect         -> device="cuda" in torch factory calls, Tensor.cuda(), Tensor.to("cuda")
                                   land on the CPU, and Tensor.type() names CPU tensors as
                                   torch.cuda.* (a TorchFunctionMode, active only inside the scope)
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

from megatron_dsv3.compat.active import ShimSet



# ----------------------------------------------------------------------------- shims
def _shim_current_device(target: str = "cpu") -> Callable[[], None]:
    # megatron/core/models/common/embeddings/rotary_pos_embedding.py RotaryEmbedding.__init__,
    # yarn_rotary_pos_embedding.py, tensor_parallel/layers.py (GPU init path),
    # dist_checkpointing/strategies/state_dict_saver.py and async_utils.py all call
    # torch.cuda.current_device() to place tensors; the CPU build raises there.
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device(target)

    def undo() -> None:
        torch.cuda.current_device = original

    return undo


def _shim_synchronize() -> Callable[[], None]:
    # megatron/core/dist_checkpointing/strategies/fully_parallel.py (exchange_loaded_tensors_*),
    # filesystem_async.py (FileSystemWriterAsync.prepare_write_data), tensor_aware_state_dict.py and
    # async_utils.py call torch.cuda.synchronize() around checkpoint I/O; the CPU build raises there.
    original = torch.cuda.synchronize
    torch.cuda.synchronize = lambda device=None: None

    def undo() -> None:
        torch.cuda.synchronize = original

    return undo


class CPURNGStatesTracker:
    """Megatron's `CudaRNGStatesTracker` interface (add / fork / get_states / set_states / reset)
    over named CPU generator states, so model-parallel RNG regions (dropout inside
    tensor-parallel regions, GPU-style weight init, activation recompute) work without CUDA."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


def _shim_rng_tracker() -> Callable[[], None]:
    # megatron/core/tensor_parallel/random.py: CudaRNGStatesTracker.add/fork use
    # torch.cuda.get_rng_state / manual_seed and _set_cuda_rng_state (torch.cuda.default_generators),
    # reached from model_parallel_cuda_manual_seed, get_cuda_rng_tracker().fork() (dropout, GPU init,
    # checkpoint recompute). Swapping the module-level tracker object (not the getter) also covers
    # modules that imported get_cuda_rng_tracker by name.
    from megatron.core.tensor_parallel import random as mpu_random

    saved = (mpu_random._CUDA_RNG_STATE_TRACKER, mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    saved_get_state = mpu_random._get_cuda_rng_state
    saved_set_state = mpu_random._set_cuda_rng_state
    mpu_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # CheckpointFunction (tensor_parallel.checkpoint / recompute) saves and restores the "cuda"
    # state with these two helpers; on CPU the default generator is the one to keep.
    mpu_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)

    def undo() -> None:
        mpu_random._CUDA_RNG_STATE_TRACKER, mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = saved
        mpu_random._get_cuda_rng_state = saved_get_state
        mpu_random._set_cuda_rng_state = saved_set_state

    return undo


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int is a CUDA ordinal to torch factories and Tensor.to (device=0 means cuda:0).
    return isinstance(device, int) and not isinstance(device, bool)


def _cuda_type_name(name: str) -> str:
    """torch.FloatTensor (CPU) or torch.meta.FloatTensor -> torch.cuda.FloatTensor."""
    if ".cuda." in name or not name.startswith("torch."):
        return name
    return "torch.cuda." + name.removeprefix("torch.").removeprefix("meta.")


class CUDARedirectMode(TorchFunctionMode):
    """Sends tensors that Megatron-Core places on CUDA to `target` instead (the CPU; `meta` in a
    rehearsal, `meta_device.py`).

    The distributed optimizer accepts only parameters whose `type()` is a torch.cuda.* name
    (optimizer/distrib_optimizer.py `_build_model_and_main_param_groups`, and
    optimizer/clip_grads.py `clip_grad_by_total_norm_fp32` asserts 'torch.cuda.FloatTensor'), so
    the argument-less `Tensor.type()` reports CPU tensors under their CUDA names here.

    Torch function modes are per thread: the redirect covers the thread that entered the shims
    (Megatron's checkpoint writer processes and other threads are not covered)."""

    def __init__(self, target: str = "cpu"):
        super().__init__()
        self.target = torch.device(target)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = self.target
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cuda_type_name(func(*args))
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], self.target, *args[2:])
        return func(*args, **kwargs)


def _shim_cuda_factories(mode: Optional[CUDARedirectMode] = None) -> Callable[[], None]:
    # megatron/core/pipeline_parallel/schedules.py (forward_backward_no_pipelining & co:
    #   total_num_tokens = torch.zeros([], device="cuda")),
    # megatron/core/optimizer/optimizer.py (FP32Optimizer / MixedPrecisionOptimizer constructors:
    #   torch.tensor(..., device='cuda')), dist_checkpointing/exchange_utils.py (.cuda(),
    #   empty_like(device="cuda")) and state_dict_saver.py (torch.tensor(device='cuda')).
    # Tensor.type(): see CUDARedirectMode.
    mode = mode or CUDARedirectMode()
    mode.__enter__()

    def undo() -> None:
        stack = torch.overrides._get_current_function_mode_stack()
        if stack and stack[-1] is mode:
            mode.__exit__(None, None, None)
            return
        if not any(m is mode for m in stack):
            return
        # A mode entered inside the shims is still active: take ours out from under it and put
        # the others back, so the redirect does not outlive the shims.
        above = []
        while True:
            top = torch._C._pop_torch_function_stack()
            if top is mode:
                break
            above.append(top)
        for other in reversed(above):
            torch._C._push_on_torch_function_stack(other)
        warnings.warn("cpu_shims: a TorchFunctionMode entered inside the shims was still active at exit; "
                      "the CUDA redirect was removed from beneath it", RuntimeWarning, stacklevel=3)

    return undo


_SHIMS: list[tuple[str, Callable[[], Callable[[], None]]]] = [
    ("torch.cuda.current_device", _shim_current_device),
    ("torch.cuda.synchronize", _shim_synchronize),
    ("megatron.core.tensor_parallel.random:cpu-rng-tracker", _shim_rng_tracker),
    ("torch:cuda-factory-redirect", _shim_cuda_factories),
]


# ------------------------------------------------------------------------------ API
_SET = ShimSet(_SHIMS, lambda: not torch.cuda.is_available())
apply = _SET.apply  # activate the shims (only without CUDA); returns the names this call activated
undo = _SET.undo  # deactivate what the matching apply() activated
active = _SET.active
cpu_shims = _SET.scope  # apply() ... undo() as a context manager
