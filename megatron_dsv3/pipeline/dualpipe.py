"""DualPipe and DualPipeV (DeepSeek-V3 report section 3.2.1, Figure 5) as Megatron-Core
forward_backward functions.

The schedule is not written twice: each rank walks its operation list from `simulate.py` (the
same lists `dsv3-schedule` times and draws), so the figure and the run cannot disagree. The phases
of a rank (warm-up forwards, near/far forwards, steady overlapped F&B pairs, cool-down backwards
with deferred weight gradients) are named in `simulate._dual_rank`.

- DualPipe on PP ranks: micro-batches 0..M/2-1 enter at rank 0, M/2..M-1 at rank PP-1; rank r
  holds model stage r (first direction) and PP-1-r (second). Both copies of a stage are one
  parameter set: their gradients are summed over `groups.mirror_group()` by the optimizer.
- DualPipeV on PP ranks: 2 PP stages in a V, rank r holds stage r and 2PP-1-r; every micro-batch
  goes down and back up. No copies.

`run_ops` drives abstract chunks (`Chunk`: forward, backward with the input gradient only or in
full, deferred weight gradient), so synthetic chunks of fixed cost run through the same code
(scripts/bench_pipeline.py). `ModelChunk` adapts a Megatron-style model chunk and
`forward_step_func`.

B and W (zero-bubble): a "B" op computes only the gradient of the chunk's input
(`torch.autograd.grad(..., retain_graph=True)`), which the previous stage waits for; its "W" op
later runs the backward into the parameters (`torch.autograd.backward(..., inputs=params)`) over
the retained graph. This defers every weight gradient, expert GEMMs included, with no change to
the layers, at the price of walking the graph twice (a GEMM-level store, as DeepSeek's reference
does with its linear layers, would not).

F&B: the forward of one micro-batch paired with the backward of another. On CPU (and here on
GPU too) the pair runs in order, forward first; the overlap the report describes (the forward's
all-to-all and p2p behind the backward's compute and vice versa) is not implemented yet.

Point-to-point: Megatron-Core's `_batched_p2p_ops` (torch.distributed's batch_isend_irecv over
Megatron's pipeline group). Its public p2p helpers are shaped for 1F1B's neighbour buffers (one
previous and one next rank, one tensor each way per call); DualPipe sends both ways to both
neighbours out of order, so each message is posted on its own. Receives are posted in the
sender's send order (known from its operation list), which is what NCCL's ordered matching
needs; sends are non-blocking and waited at the end of the step.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_dsv3.parallel.layout import num_stages, rank_stages
from megatron_dsv3.pipeline import simulate


class Chunk(Protocol):
    """One model stage on this rank, seen by the schedule."""

    def forward(self, mb: int, input_sbh: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Output activation for the next stage (None on the last stage)."""

    def backward(self, mb: int, output_grad: Optional[torch.Tensor], split: bool) -> Optional[torch.Tensor]:
        """The input's gradient (None on the first stage); `split`: defer the weight gradient to `weight_grad`."""

    def weight_grad(self, mb: int) -> None:
        """The deferred weight gradient of micro-batch `mb`."""


def build(name: str, pp: int, micro_batches: int) -> simulate.Schedule:
    """The operation lists of `name` on `pp` ranks (DualPipeV: 2 pp stages)."""
    return simulate.dualpipe(pp, micro_batches) if name == "dualpipe" else simulate.dualpipev(2 * pp, micro_batches)


def owners(schedule: simulate.Schedule) -> dict[simulate.Chunk, int]:
    """(micro-batch, stage) -> the pipeline rank that runs it."""
    return {op.forward: rank for rank, ops in enumerate(schedule.ranks) for op in ops if op.forward is not None}


def messages(schedule: simulate.Schedule, src: int, dst: int) -> list[tuple[str, simulate.Chunk]]:
    """What pipeline rank `src` sends to `dst`, in its order: ("F", (mb, s)) the output of stage s
    (for stage s+1), ("B", (mb, s)) the input gradient of stage s (for stage s-1)."""
    owner, last, sent = owners(schedule), schedule.stages - 1, []
    for op in schedule.ranks[src]:
        if op.forward is not None and op.forward[1] < last and owner[op.forward[0], op.forward[1] + 1] == dst:
            sent.append(("F", op.forward))
        if op.kind in ("B", "BW", "F&B") and op.backward[1] > 0 and owner[op.backward[0], op.backward[1] - 1] == dst:
            sent.append(("B", op.backward))
    return sent


class Transport:
    """Sends and receives of one rank over the pipeline group (see the module docstring)."""

    def __init__(self, schedule: simulate.Schedule, rank: int, group: Optional[dist.ProcessGroup],
                 shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.schedule, self.rank, self.group = schedule, rank, group
        self.global_ranks = dist.get_process_group_ranks(group) if group is not None else [0]
        self.shape, self.dtype, self.device = shape, dtype, device
        self.expected = {src: messages(schedule, src, rank) for src in range(len(schedule.ranks)) if src != rank}
        self.arrived: dict[tuple[str, simulate.Chunk], torch.Tensor] = {}
        self.local: dict[tuple[str, simulate.Chunk], torch.Tensor] = {}
        self.pending_sends: list = []

    def _p2p(self, peer: int, send: Optional[torch.Tensor] = None, recv: Optional[torch.Tensor] = None) -> list:
        from megatron.core.pipeline_parallel.p2p_communication import _batched_p2p_ops

        peer = self.global_ranks[peer]
        return _batched_p2p_ops(tensor_send_prev=None, tensor_recv_prev=None, tensor_send_next=send,
                                tensor_recv_next=recv, group=self.group, prev_pipeline_rank=peer,
                                next_pipeline_rank=peer)

    def send(self, key: tuple[str, simulate.Chunk], tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.detach().to(self.dtype).contiguous()
        if dst == self.rank:  # DualPipeV's turn of the V: stage PP-1 -> PP on one rank
            self.local[key] = tensor
            return
        self.pending_sends.append((self._p2p(dst, send=tensor), tensor))

    def recv(self, key: tuple[str, simulate.Chunk], src: int) -> torch.Tensor:
        if src == self.rank:
            return self.local.pop(key)
        queue = self.expected[src]
        while key not in self.arrived:
            if not queue:
                raise RuntimeError(f"pipeline rank {self.rank} waits for {key} that rank {src} never sends")
            expected = queue.pop(0)
            buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            for request in self._p2p(src, recv=buffer):
                request.wait()
            self.arrived[expected] = buffer
        return self.arrived.pop(key)

    def finish(self) -> None:
        for requests, _ in self.pending_sends:
            for request in requests:
                request.wait()
        self.pending_sends.clear()


def run_ops(schedule: simulate.Schedule, rank: int, chunks: dict[int, Chunk], transport: Transport,
            on_op: Optional[Callable[[simulate.Op], None]] = None) -> None:
    """Run pipeline rank `rank`'s operations of `schedule` on its `chunks` (by stage): each
    forward receives its input from the previous stage's rank and sends its output on; each
    backward receives its output's gradient from the next stage's rank and sends the input's back.
    F&B runs its forward, then its backward (no overlap, see the module docstring)."""
    owner, last = owners(schedule), schedule.stages - 1
    for op in schedule.ranks[rank]:
        if op.forward is not None:
            mb, stage = op.forward
            x = None if stage == 0 else transport.recv(("F", (mb, stage - 1)), owner[mb, stage - 1])
            y = chunks[stage].forward(mb, x)
            if stage < last:
                transport.send(("F", op.forward), y, owner[mb, stage + 1])
        if op.kind in ("B", "BW", "F&B"):
            mb, stage = op.backward
            g = None if stage == last else transport.recv(("B", (mb, stage + 1)), owner[mb, stage + 1])
            dx = chunks[stage].backward(mb, g, split=op.kind == "B")
            if stage > 0:
                transport.send(("B", op.backward), dx, owner[mb, stage - 1])
        if op.kind == "W":
            chunks[op.chunks[0][1]].weight_grad(op.chunks[0][0])
        if on_op is not None:
            on_op(op)
    transport.finish()


class ModelChunk:
    """A Megatron-style model chunk (`set_input_tensor`, called through `forward_step_func(data_iterator,
    chunk)` -> (output, loss_func)) as a `Chunk` of model stage `stage` of `stages`. The last stage's
    loss is divided by the micro-batch count, as Megatron's schedules do; `losses` collects what
    its loss_func reports."""

    def __init__(self, chunk: Any, stage: int, stages: int, forward_step_func: Callable, data: Iterator,
                 num_microbatches: int):
        self.chunk, self.stage, self.last = chunk, stage, stage == stages - 1
        self.forward_step_func, self.data, self.num_microbatches = forward_step_func, data, num_microbatches
        module = getattr(chunk, "module", chunk)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.saved: dict[int, tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        self.deferred: dict[int, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self.losses: list[Any] = []

    def forward(self, mb: int, input_sbh: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        x = None if input_sbh is None else input_sbh.detach().requires_grad_()
        self.chunk.set_input_tensor([x])
        output, loss_func = self.forward_step_func(self.data, self.chunk)
        if self.last:  # loss_func gives (loss, report) or, in newer Megatron releases, (loss, tokens, report)
            result = loss_func(output)
            loss, reported = result[0], result[-1]
            self.losses.append(reported)
            self.saved[mb] = (x, loss / self.num_microbatches)
            return None
        self.saved[mb] = (x, output)
        return output.detach()

    def backward(self, mb: int, output_grad: Optional[torch.Tensor], split: bool) -> Optional[torch.Tensor]:
        x, y = self.saved.pop(mb)
        grad = None if output_grad is None else output_grad.to(y.dtype)
        if not split:
            torch.autograd.backward(y, grad)
            return None if x is None else x.grad
        self.deferred[mb] = (y, grad)
        if x is None:
            return None
        (dx,) = torch.autograd.grad(y, x, grad, retain_graph=True)
        return dx

    def weight_grad(self, mb: int) -> None:
        y, grad = self.deferred.pop(mb)
        torch.autograd.backward(y, grad, inputs=self.params)


def make_forward_backward(name: str) -> Callable:
    """The forward_backward function of schedule `name` ("dualpipe" or "dualpipev"), with the
    signature Megatron-Core's `get_forward_backward_func()` result is called with."""

    def forward_backward(*, forward_step_func: Callable, data_iterator, model: list, num_microbatches: int,
                         seq_length: int, micro_batch_size: int, decoder_seq_length: Optional[int] = None,
                         forward_only: bool = False, collect_non_loss_data: bool = False,
                         first_val_step: Optional[bool] = None, adjust_tensor_shapes_fn=None,
                         p2p_communicator=None, pg_collection=None, **ignored) -> list:
        """One step over `num_microbatches` micro-batches; `model` is this rank's two chunks in
        `layout.rank_stages` order. Returns what the last stage's loss_func reported per micro-batch.
        Keyword arguments of other Megatron releases that do not apply here are accepted and ignored."""
        from megatron_dsv3.parallel import comm, groups

        if forward_only:
            raise ValueError(f"parallel.schedule={name!r} trains only (forward_only=True is not supported): "
                             "evaluate with the 1f1b schedule")
        group = groups.pp_group()
        pp, rank = groups.size(group), groups.rank(group)
        model = model if isinstance(model, list) else [model]
        stages = rank_stages(name, pp, rank)
        if len(model) != 2:
            raise ValueError(f"{name}: rank {rank} needs its two model chunks (stages {stages}), got {len(model)}")
        schedule = build(name, pp, num_microbatches)
        order = {s: [op.forward[0] for op in schedule.ranks[rank] if op.forward is not None and op.forward[1] == s]
                 for s in stages}
        if isinstance(data_iterator, list):  # Megatron's virtual pipeline: one iterator per chunk
            data = dict(zip(stages, data_iterator))
        else:  # each micro-batch once, handed to each chunk in the order it runs them
            batches = [next(data_iterator) for _ in range(num_microbatches)]
            data = {s: iter([batches[mb] for mb in order[s]]) for s in stages}
        total = num_stages(name, pp)
        chunks = {s: ModelChunk(c, s, total, forward_step_func, data[s], num_microbatches)
                  for s, c in zip(stages, model)}
        config = model[0].config
        shape = (seq_length, micro_batch_size, config.hidden_size)
        dtype = getattr(config, "pipeline_dtype", None) or torch.float32
        device = comm.device_of(group) if group is not None else torch.device("cpu")
        run_ops(schedule, rank, chunks, Transport(schedule, rank, group, shape, dtype, device))
        return [loss for c in chunks.values() for loss in c.losses]

    forward_backward.__name__ = f"{name}_forward_backward"
    return forward_backward


def mark_mirror_copies(model: torch.nn.Module, copy: int) -> None:
    """Tag every tensor of a DualPipe rank's model with which copy of its stages it is (0 on pipeline
    ranks < PP/2, 1 on their mirrors): copy 1 is not counted in the gradient norm nor saved."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.mirror_copy = copy
