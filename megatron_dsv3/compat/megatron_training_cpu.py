"""Run Megatron-LM's own training loop (`megatron.training`: pretrain, get_model, train, evaluate)
on a machine without CUDA: the shims of `megatron_cpu` plus those `megatron.training` needs.

    with training_cpu_shims():      # a no-op where CUDA is available
        pretrain(...)

`CPU_FLAGS` are the Megatron-LM flags a CPU run needs besides (a gloo backend, no fused CUDA
kernels, CPU initialisation); `megatron_dsv3.megatron_lm` makes them the parser's defaults when
no GPU is present, so a command line that names them otherwise still wins.

Shims (listed by `megatron_dsv3.compat.applied()` while active), each seen failing with
megatron-core 0.19.2's `megatron.training` (torch 2.14.1, no GPU) and present in 0.16.1-0.18.2:
  megatron.training.training:initialize_megatron(allow_no_cuda)
      initialize.py `initialize_megatron` asserts torch.cuda.is_available() unless allow_no_cuda
  megatron.training.initialize:_initialize_distributed(model-parallel-groups)
      creates Megatron's process groups (initialize_model_parallel) only if torch.cuda.device_count() > 0
  megatron.training.initialize:_set_random_seed(model-parallel-rng)
      seeds the model-parallel RNG tracker, which Megatron skips when torch.cuda.device_count() is 0
      (the tracker is then empty and `fork()` fails: activation recompute, dropout)
  torch.cuda:stream-stand-ins
      torch.cuda.Stream / current_stream / stream: get_model builds the DDP wrappers inside a side
      stream; DDP's grad buffers wait on the current stream
  torch.cuda:rng-state-stand-ins
      torch.cuda.get_rng_state / set_rng_state read and set the CPU generator's state: a checkpoint
      saves the CUDA generator's state (checkpointing.py `get_rng_state`) and a load sets it
  megatron.legacy.fused_kernels:load(no-nvcc)   (0.16 only: Megatron-LM's megatron/legacy)
      initialize.py loads its fused CUDA kernels through `nvcc -V` on every rank
and everything of `megatron_cpu.cpu_shims()` (current_device, synchronize, the CPU RNG tracker,
device="cuda" factories).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import runpy
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from megatron_dsv3.compat import megatron_cpu
from megatron_dsv3.compat.active import mark, unmark
from megatron_dsv3.compat.megatron_training_wheel import prebuilt_dataset_helpers

# Megatron-LM flag (its argparse `dest`) -> the value a run without CUDA needs.
CPU_FLAGS: dict[str, Any] = {
    "distributed_backend": "gloo",          # NCCL needs GPUs
    "use_cpu_initialization": True,         # weights are made where they live
    "masked_softmax_fusion": False,         # 0.16-0.18 compile fused softmax kernels with nvcc
    "bias_gelu_fusion": False,
    "bias_swiglu_fusion": False,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,  # needs APEX / TE's fused wgrad kernels
    "rerun_mode": "disabled",               # its state machine saves torch.cuda.get_rng_state()
}


class _CPUStream:
    """torch.cuda.Stream on a CPU: work runs in program order, so waiting is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _shim_streams() -> Callable[[], None]:
    saved = (torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream)
    torch.cuda.Stream = _CPUStream
    torch.cuda.current_stream = lambda device=None: _CPUStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()

    def undo() -> None:
        torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream = saved

    return undo


def _shim_rng_state() -> Callable[[], None]:
    saved = (torch.cuda.get_rng_state, torch.cuda.set_rng_state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)

    def undo() -> None:
        torch.cuda.get_rng_state, torch.cuda.set_rng_state = saved

    return undo


def _rebind(module_name: str, attribute: str, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    module = importlib.import_module(module_name)
    original = getattr(module, attribute)
    setattr(module, attribute, make(original))

    def undo() -> None:
        setattr(module, attribute, original)

    return undo


def _shim_allow_no_cuda() -> Callable[[], None]:
    # pretrain() calls initialize_megatron(...) by the name training.py imported.
    return _rebind("megatron.training.training", "initialize_megatron",
                   lambda original: functools.partial(original, allow_no_cuda=True))


def _one_device(original: Callable) -> Callable:
    """`original` run as if one CUDA device were visible: torch.cuda.device_count() reads 1 and
    torch.cuda.set_device does nothing."""

    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        saved = (torch.cuda.device_count, torch.cuda.set_device)
        torch.cuda.device_count, torch.cuda.set_device = (lambda: 1), (lambda device: None)
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.device_count, torch.cuda.set_device = saved

    return run


def _shim_model_parallel_init() -> Callable[[], None]:
    # initialize.py `_initialize_distributed` calls mpu.initialize_model_parallel(...) only
    # `if device_count > 0` (torch.cuda.device_count()); the device it then picks
    # (torch.cuda.set_device(local_rank), device_id) reaches only the in-process-restart NCCL warm-up.
    return _rebind("megatron.training.initialize", "_initialize_distributed", _one_device)


def _shim_model_parallel_seed() -> Callable[[], None]:
    # initialize.py `_set_random_seed` calls tensor_parallel.model_parallel_cuda_manual_seed(seed, ...)
    # only `if torch.cuda.device_count() > 0`: so the (CPU) tracker gets Megatron's own seeds.
    # torch.cuda.manual_seed there is queued lazily and never runs.
    return _rebind("megatron.training.initialize", "_set_random_seed", _one_device)


def _shim_fused_kernels() -> Optional[Callable[[], None]]:
    # 0.16's initialize.py `_compile_dependencies` calls megatron.legacy.fused_kernels.load(args), which
    # runs `nvcc -V` (TypeError without a CUDA toolkit: CUDA_HOME is None); its kernels are CUDA-only.
    # Later releases load no fused kernels there.
    if importlib.util.find_spec("megatron.legacy") is None or \
            importlib.util.find_spec("megatron.legacy.fused_kernels") is None:
        return None
    return _rebind("megatron.legacy.fused_kernels", "load", lambda original: lambda args: None)


_SHIMS: list[tuple[str, Callable[[], Optional[Callable[[], None]]]]] = [
    ("megatron.training.training:initialize_megatron(allow_no_cuda)", _shim_allow_no_cuda),
    ("megatron.training.initialize:_initialize_distributed(model-parallel-groups)", _shim_model_parallel_init),
    ("megatron.training.initialize:_set_random_seed(model-parallel-rng)", _shim_model_parallel_seed),
    ("torch.cuda:stream-stand-ins", _shim_streams),
    ("torch.cuda:rng-state-stand-ins", _shim_rng_state),
    ("megatron.legacy.fused_kernels:load(no-nvcc)", _shim_fused_kernels),
]


@contextlib.contextmanager
def training_cpu_shims() -> Iterator[None]:
    """Megatron-LM's training loop on a CPU; nothing happens where CUDA is available. Everything is
    restored on exit, even on an exception."""
    if torch.cuda.is_available():
        yield
        return
    undo: list[tuple[str, Callable[[], None]]] = []
    try:
        with megatron_cpu.cpu_shims():
            for name, shim in _SHIMS:
                restore = shim()
                if restore is not None:
                    undo.append((name, restore))
                    mark(name)
            yield
    finally:
        for name, restore in reversed(undo):
            restore()
            unmark(name)


def cpu_flags() -> list[str]:
    """`CPU_FLAGS` as Megatron-LM command-line flags (for scripts that do not set parser defaults)."""
    spelled = {"distributed_backend": ["--distributed-backend", "gloo"], "use_cpu_initialization":
               ["--use-cpu-initialization"], "rerun_mode": ["--rerun-mode", "disabled"],
               "masked_softmax_fusion": ["--no-masked-softmax-fusion"], "bias_gelu_fusion": ["--no-bias-gelu-fusion"],
               "bias_swiglu_fusion": ["--no-bias-swiglu-fusion"], "bias_dropout_fusion": ["--no-bias-dropout-fusion"],
               "apply_rope_fusion": ["--no-rope-fusion"], "gradient_accumulation_fusion":
               ["--no-gradient-accumulation-fusion"]}
    return [flag for dest in CPU_FLAGS for flag in spelled[dest]]


def main() -> None:
    """`python -m megatron_dsv3.compat.megatron_training_cpu SCRIPT ARGS...`: run a Megatron-LM script
    (pretrain_gpt.py, ...) as __main__ inside these shims, with `cpu_flags()` appended."""
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m megatron_dsv3.compat.megatron_training_cpu SCRIPT [ARGS...]")
    script = sys.argv[1]
    sys.argv = [script, *sys.argv[2:], *([] if torch.cuda.is_available() else cpu_flags())]
    sys.path.insert(0, str(Path(script).resolve().parent))
    with training_cpu_shims(), prebuilt_dataset_helpers():
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
