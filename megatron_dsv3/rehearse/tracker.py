"""Live device bytes by kind over a training step: the program's own allocations, not a model of them.

`MemoryTracker` is a TorchDispatchMode: it sees every aten op the step runs (forward, the autograd
engine's backward, collectives, the optimizer) and the storages its outputs live in, and hears from
torch when each storage is freed. The same tracker runs on meta (a rehearsal) and on a real device,
so the two can be compared byte for byte. A storage's kind:

    parameters     the model's parameters and buffers (Megatron's DDP parameter buffer included)
    gradients      .grad and Megatron's main_grad buffers
    optimizer      Adam moments and FP32 master copies
    activations    tensors autograd saved for backward (saved-tensor hooks)
    communication  tensors a collective or point-to-point op wrote or sent, not saved for backward
    other          everything else: the forward's and backward's temporaries, gradients in flight

It also records the peak of the step (bytes by kind, and the operation, module and code line where
it happened), the host's reads of device values, and, with `refuse_cpu` (meta standing for the
GPU), fails on any tensor of the step that is created on, or read from, the CPU.
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("parameters", "gradients", "optimizer", "activations", "communication", "other")
FIXED = ("parameters", "gradients", "optimizer")  # set when registered, never changed by the step
PACKAGE = Path(__file__).resolve().parents[1]
NOT_THE_PROGRAM = (PACKAGE / "rehearse", PACKAGE / "compat")  # frames that name no code of the step


class RehearsalError(RuntimeError):
    """The step did something a GPU run would fail at or pay for: the message names the op and where."""


@dataclass
class Where:
    """An operation of the step: the aten op, the phase, the innermost module running and the code line."""

    op: str
    phase: str
    module: str
    code: str

    def describe(self) -> str:
        module = f" in {self.module}" if self.module else ""
        return f"{self.op} ({self.phase}{module}, {self.code})"


@dataclass
class MemoryReport:
    device: str
    peak_bytes: int
    peak_by_kind: dict[str, int]
    peak_where: Optional[Where]
    start_by_kind: dict[str, int]  # when the step began: what build left
    end_by_kind: dict[str, int]
    max_by_kind: dict[str, int]  # each kind's own most over the step (not at one moment)
    host_reads: dict[str, int]  # code line -> reads of device values there
    ops: int
    # what held the bytes near the peak (within PEAK_DETAIL of it): "kind: module (op)" -> bytes,
    # layer numbers folded ("layers.N"), largest first
    peak_origins: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "peak_bytes": self.peak_bytes, "peak_by_kind": self.peak_by_kind,
                "peak_where": None if self.peak_where is None else self.peak_where.__dict__,
                "start_by_kind": self.start_by_kind, "end_by_kind": self.end_by_kind, "max_by_kind": self.max_by_kind,
                "host_reads": self.host_reads, "ops": self.ops, "peak_origins": self.peak_origins}


@dataclass
class _Storage:
    nbytes: int
    kind: str
    origin: str  # the module (layer numbers folded) and op that created it
    finalizer: Optional[weakref.finalize] = field(default=None, repr=False)


PEAK_DETAIL = 0.005  # the origins are snapshot when the peak grows by this fraction


class MemoryTracker(TorchDispatchMode):
    """Track the storages on `device` from entry to exit; `step()` marks the span whose peak counts."""

    def __init__(self, device: torch.device, refuse_cpu: bool = False):
        super().__init__()
        self.device, self.refuse_cpu = torch.device(device), refuse_cpu
        self.live: dict[int, _Storage] = {}
        self.bytes = dict.fromkeys(KINDS, 0)
        self.total = self.peak = 0
        self.peak_by_kind = dict(self.bytes)
        self.max_by_kind = dict(self.bytes)
        self.peak_where: Optional[Where] = None
        self.start_by_kind: dict[str, int] = {}
        self.in_step = False
        self.phases: list[str] = []
        self.modules: list[int] = []  # ids of the modules whose forward runs, innermost last
        self.names: dict[int, str] = {}
        self.by_origin: Counter = Counter()  # (kind, origin) -> live bytes
        self.peak_origins: Counter = Counter()
        self._detailed_peak = 0
        self._origin = "build"
        self.host_reads: Counter = Counter()
        self.ops = 0
        self._exits = contextlib.ExitStack()

    # ------------------------------------------------------------------ scope
    def __enter__(self):
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._exits.enter_context(hooks)
        self._exits.callback(nn.modules.module.register_module_forward_pre_hook(self._enter_module).remove)
        self._exits.callback(nn.modules.module.register_module_forward_hook(self._leave_module).remove)
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._exits.close()
        for record in self.live.values():  # torch frees these later; nothing here hears it
            if record.finalizer is not None:
                record.finalizer.detach()
        return result

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Name what runs inside (the optimizer step, the routing-bias update, the build)."""
        self.phases.append(name)
        try:
            yield
        finally:
            self.phases.pop()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """The span whose peak is reported; what is live when it starts is `start_by_kind`."""
        self.start_by_kind, self.peak, self.peak_where, self.in_step = dict(self.bytes), 0, None, True
        self.max_by_kind = dict(self.bytes)
        self._detailed_peak = 0
        self._new_peak(None)
        try:
            yield
        finally:
            self.in_step = False

    # ------------------------------------------------------------------ kinds
    def register(self, tensors, kind: str) -> None:
        """Give the storages of `tensors` the fixed kind `kind`, unless they have one already (the
        local optimizer's parameter groups are the model's parameters)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device == self.device:
                record = self._record(tensor)
                if record.kind not in FIXED:
                    self._set_kind(record, kind, fixed=True)

    def register_training_state(self, model: nn.Module, optimizer) -> None:
        """The model's parameters and buffers, their gradients (main_grad: Megatron's DDP buffers) and
        the optimizer's state and master weights, once built."""
        self.names = {id(module): re.sub(r"\.\d+(?=\.|$)", ".N", name) or type(module).__name__
                      for name, module in model.named_modules()}
        self.register([*model.parameters(), *model.buffers()], "parameters")
        self.register([g for p in model.parameters() for g in (p.grad, getattr(p, "main_grad", None))], "gradients")
        self.register(list(optimizer_tensors(optimizer)), "optimizer")
        for param in model.parameters():
            if param.requires_grad:
                hook = param.register_post_accumulate_grad_hook(lambda p: self.register([p.grad], "gradients"))
                self._exits.callback(hook.remove)

    def _record(self, tensor: torch.Tensor) -> _Storage:
        storage = tensor.untyped_storage()
        key = id(storage)
        record = self.live.get(key)
        if record is None:
            record = self.live[key] = _Storage(storage.nbytes(), "other", self._origin)
            record.finalizer = weakref.finalize(storage, self._free, key)
            self.bytes["other"] += record.nbytes
            self.max_by_kind["other"] = max(self.max_by_kind["other"], self.bytes["other"])
            self.by_origin["other", record.origin] += record.nbytes
            self.total += record.nbytes
        return record

    def _set_kind(self, record: _Storage, kind: str, fixed: bool = False) -> None:
        if record.kind == kind or (not fixed and (record.kind in FIXED or KINDS.index(record.kind) < KINDS.index(kind))):
            return  # the step only moves other -> communication -> activations
        self.bytes[record.kind] -= record.nbytes
        self.bytes[kind] += record.nbytes
        self.max_by_kind[kind] = max(self.max_by_kind[kind], self.bytes[kind])
        self.by_origin[record.kind, record.origin] -= record.nbytes
        self.by_origin[kind, record.origin] += record.nbytes
        record.kind = kind
        if self.total == self.peak:  # still the peak's moment: it had this storage under its new kind
            self.peak_by_kind = dict(self.bytes)

    def _free(self, key: int) -> None:
        record = self.live.pop(key, None)
        if record is not None:
            self.bytes[record.kind] -= record.nbytes
            self.by_origin[record.kind, record.origin] -= record.nbytes
            self.total -= record.nbytes

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == self.device:
            self._set_kind(self._record(tensor), "activations")
        return tensor

    def _enter_module(self, module: nn.Module, args) -> None:
        if torch._C._current_autograd_node() is None:  # not a recomputation, which may stop midway
            self.modules.append(id(module))

    def _leave_module(self, module: nn.Module, args, output) -> None:
        if id(module) in self.modules:  # a forward that raised left its name: drop it too
            del self.modules[len(self.modules) - 1 - self.modules[::-1].index(id(module)):]

    # ------------------------------------------------------------------ ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            return self._host_read(func, args[0])
        if self.refuse_cpu and self.in_step:
            self._refuse_cpu(func, (args, tuple(kwargs.values())), "reads")
        try:
            out = func(*args, **kwargs)
        except RuntimeError as error:
            if not self.in_step:
                raise
            raise RehearsalError(f"{self._where(func).describe()} failed: {error}") from error
        outputs = _tensors(out)
        self._origin = self._origin_of(func)
        if self.refuse_cpu and self.in_step:
            self._refuse_cpu(func, outputs, "created")
        communicating = func.namespace == "c10d"
        for tensor in (outputs + _tensors(args) if communicating else outputs):
            if tensor.device == self.device:
                record = self._record(tensor)
                if communicating:
                    self._set_kind(record, "communication")
        if self.total > self.peak and self.in_step:
            self._new_peak(func)
        return out

    def _new_peak(self, func) -> None:
        self.peak, self.peak_by_kind = self.total, dict(self.bytes)
        self.peak_where = None if func is None else self._where(func)
        if self.peak > self._detailed_peak * (1 + PEAK_DETAIL):
            self._detailed_peak = self.peak
            self.peak_origins = Counter({key: b for key, b in self.by_origin.items() if b > 0})

    def _origin_of(self, func) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return f"backward {node.name()}"
        if self.phases:
            return self.phases[-1]
        return f"{self.names.get(self.modules[-1], '?') if self.modules else '-'} ({func.__name__})"

    def _host_read(self, func, tensor: torch.Tensor):
        """A device value read on the host (.item(), float(), bool()). On meta it has no value: a
        floating one (a loss, a norm) reads as NaN; any other one (a size, a flag) cannot be
        rehearsed, since only the dispatcher's split sizes come from the routing assumption."""
        if self.in_step and tensor.device == self.device:
            self.host_reads[_code_line(inside_libraries=True)] += 1
        if not tensor.is_meta:
            return func(tensor)
        if tensor.is_floating_point():
            return math.nan
        raise RehearsalError(f"{self._where(func).describe()} reads a {tensor.dtype} device value on the host: a "
                             "rehearsal cannot know it (only the dispatcher's split sizes come from the routing "
                             "assumption)")

    def _refuse_cpu(self, func, values, verb: str) -> None:
        """A CPU tensor other than a scalar (which a GPU kernel takes as an argument), outside a
        collective of pickled host objects (whose bytes are host memory by design)."""
        if _in_object_collective():
            return
        for tensor in _tensors(values):
            if tensor.device.type == "cpu" and tensor.dim() > 0:
                raise RehearsalError(
                    f"{self._where(func).describe()} {verb} a CPU tensor {list(tensor.shape)} {tensor.dtype} in "
                    f"the step, where the run's device is expected (meta stands for the GPU)")

    def _where(self, func) -> Where:
        node = torch._C._current_autograd_node()
        phase = f"backward {node.name()}" if node is not None else self.phases[-1] if self.phases else "forward"
        module = self.names.get(self.modules[-1], "") if self.modules and node is None else ""
        return Where(str(func), phase, module, _code_line())

    def report(self) -> MemoryReport:
        origins = {f"{kind}: {origin}": b for (kind, origin), b in self.peak_origins.most_common()
                   if kind not in FIXED}
        return MemoryReport(str(self.device), self.peak, self.peak_by_kind, self.peak_where, self.start_by_kind,
                            dict(self.bytes), dict(self.max_by_kind), dict(self.host_reads.most_common()), self.ops,
                            origins)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in `value`: a tensor, or (nested) lists and tuples of values."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    """The tensors an optimizer keeps: its state and master parameters (`LocalOptimizer`'s AdamW, or
    each of `ZeRO1Optimizer`'s Megatron shard optimizers)."""
    inner = [optimizer.adam] if hasattr(optimizer, "adam") else [s.optimizer for s in optimizer.shards]
    for torch_optimizer in inner:
        for group in torch_optimizer.param_groups:
            yield from group["params"]
        for state in torch_optimizer.state.values():
            yield from (t for t in state.values() if isinstance(t, torch.Tensor))


# torch.distributed's collectives of pickled objects: their sizes and bytes live on the host
OBJECT_COLLECTIVES = {"all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list"}


def _in_object_collective() -> bool:
    """Whether this thread is inside one of torch.distributed's object collectives."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in OBJECT_COLLECTIVES and frame.f_code.co_filename.endswith("distributed_c10d.py"):
            return True
        frame = frame.f_back
    return False


def _code_line(inside_libraries: bool = False) -> str:
    """The innermost frame of the program (the package less this tracker and the shims) as
    path:line (function); with `inside_libraries`, of a library it called (Megatron-Core) too."""
    frame = sys._getframe(2)
    fallback = None
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if not any(path.is_relative_to(skip) for skip in NOT_THE_PROGRAM) and "torch" not in path.parts:
            if path.is_relative_to(PACKAGE):
                return f"{path.relative_to(PACKAGE.parent)}:{frame.f_lineno} ({frame.f_code.co_name})"
            library = f"{'/'.join(path.parts[-3:])}:{frame.f_lineno} ({frame.f_code.co_name})"
            if inside_libraries:
                return library
            fallback = fallback or library
        frame = frame.f_back
    return fallback or "?"
