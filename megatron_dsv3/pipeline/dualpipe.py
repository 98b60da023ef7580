"""DualPipe and DualPipeV (DeepSeek-V3 report section 3.2.1, Figure 5): their `Schedule`
descriptors (`DUALPIPE`, `DUALPIPEV`) and their executor, a Megatron-Core forward_backward function.

The schedule is not written twice: each rank walks its operation list from `simulate.py` (the
same lists `dsv3-schedule` times and draws), so the figure and the run cannot disagree. The phases
of a rank (warm-up forwards, near/far forwards, steady overlapped F&B pairs, cool-down backwards
with deferred weight gradients) are named in `simulate._dual_rank`.

- DualPipe on PP ranks: micro-batches 0..M/2-1 enter at rank 0, M/2..M-1 at rank PP-1; rank r
  holds model stage r (first direction) and PP-1-r (second). Both copies of a stage are one
  parameter set: their gradients are summed over `groups.mirror_group()` by the optimizer.
- DualPipeV on PP ranks: 2 PP stages in a V, rank r holds stage r and 2PP-1-r; every micro-batch
  goes down and back up. No copies.

`run_ops` drives abstract stages (`StageRunner`: forward, backward with the input gradient only or
in full, deferred weight gradient), so synthetic stages of fixed cost run through the same code
(scripts/bench_pipeline.py). `ModelChunk` runs a Megatron-style model chunk (one model stage's
module on this rank) through `forward_step_func`.

B and W (zero-bubble): a "B" op computes only the gradient of the stage's input (piece by piece,
`torch.autograd.grad(..., retain_graph=True)`), which the previous stage waits for; its "W" op
later runs the backward into the parameters (`torch.autograd.backward(..., inputs=params)`) over
the retained graphs. This defers every weight gradient, expert GEMMs included, with no change to
the layers, at the price of walking the graph twice (a GEMM-level store, as DeepSeek's reference
does with its linear layers, would not).

F&B: the forward of one micro-batch paired with the backward of another, interleaved piece by
piece (attention, dispatch, experts, combine) so that each one's communication runs behind the
other's computation: `overlap.py` says which piece overlaps which. Chunks whose model
`pieces.stage_pieces` cannot cut, or whose forward_step_func takes no `return_schedule_plan`, run
the pair in order, forward first.

Point-to-point: Megatron-Core's `_batched_p2p_ops` (torch.distributed's batch_isend_irecv over
Megatron's pipeline group). Its public p2p helpers are shaped for 1F1B's neighbour buffers (one
previous and one next rank, one tensor each way per call); DualPipe sends both ways to both
neighbours out of order, so each message is posted on its own. Receives are posted in the
sender's send order (known from its operation list), which is what NCCL's ordered matching
needs, and waited only where the data is used (`Transport.post`); sends are non-blocking and
waited at the end of the step.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel.p2p_communication import _batched_p2p_ops

from megatron_dsv3 import registry
from megatron_dsv3.parallel import comm, groups
from megatron_dsv3.pipeline import simulate
from megatron_dsv3.pipeline.overlap import Segmented, Step, Streams, run_chain, run_pair
from megatron_dsv3.pipeline.pieces import COMPUTE, cuttable
from megatron_dsv3.pipeline.schedule import ForwardBackward, Schedule, ScheduleRefused, get, register

Arrival = Callable[[], Optional[torch.Tensor]]  # waits for a received tensor and returns it


class StageRunner(Protocol):
    """What the schedule asks of one model stage on this rank. A runner may also offer its forward
    and backward as steps (`forward_steps`, `backward_steps`, as `ModelChunk` does) and say it is
    `segmented`; F&B pairs of segmented runners interleave."""

    def forward(self, mb: int, input_sbh: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Output activation for the next stage (None on the last stage)."""

    def backward(self, mb: int, output_grad: Optional[torch.Tensor], split: bool) -> Optional[torch.Tensor]:
        """The input's gradient (None on the first stage); `split`: defer the weight gradient to `weight_grad`."""

    def weight_grad(self, mb: int) -> None:
        """The deferred weight gradient of micro-batch `mb`."""


def owners(op_lists: simulate.OpLists) -> dict[simulate.MicroStage, int]:
    """(micro-batch, stage) -> the pipeline rank that runs it."""
    return {op.forward: rank for rank, ops in enumerate(op_lists.ranks) for op in ops if op.forward is not None}


def messages(op_lists: simulate.OpLists, src: int, dst: int) -> list[tuple[str, simulate.MicroStage]]:
    """What pipeline rank `src` sends to `dst`, in its order: ("F", (mb, s)) the output of stage s
    (for stage s+1), ("B", (mb, s)) the input gradient of stage s (for stage s-1)."""
    owner, last, sent = owners(op_lists), op_lists.stages - 1, []
    for op in op_lists.ranks[src]:
        if op.forward is not None and op.forward[1] < last and owner[op.forward[0], op.forward[1] + 1] == dst:
            sent.append(("F", op.forward))
        if op.kind in ("B", "BW", "F&B") and op.backward[1] > 0 and owner[op.backward[0], op.backward[1] - 1] == dst:
            sent.append(("B", op.backward))
    return sent


class Transport:
    """Sends and receives of one rank over the pipeline group (see the module docstring)."""

    def __init__(self, op_lists: simulate.OpLists, rank: int, group: Optional[dist.ProcessGroup],
                 shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.op_lists, self.rank, self.group = op_lists, rank, group
        self.global_ranks = dist.get_process_group_ranks(group) if group is not None else [0]
        self.shape, self.dtype, self.device = shape, dtype, device
        self.expected = {src: messages(op_lists, src, rank) for src in range(len(op_lists.ranks)) if src != rank}
        self.posted: dict[tuple[str, simulate.MicroStage], tuple[torch.Tensor, list]] = {}
        self.local: dict[tuple[str, simulate.MicroStage], torch.Tensor] = {}
        self.pending_sends: list = []

    def _p2p(self, peer: int, send: Optional[torch.Tensor] = None, recv: Optional[torch.Tensor] = None) -> list:
        peer = self.global_ranks[peer]
        return _batched_p2p_ops(tensor_send_prev=None, tensor_recv_prev=None, tensor_send_next=send,
                                tensor_recv_next=recv, group=self.group, prev_pipeline_rank=peer,
                                next_pipeline_rank=peer)

    def send(self, key: tuple[str, simulate.MicroStage], tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.detach().to(self.dtype).contiguous()
        if dst == self.rank:  # DualPipeV's turn of the V: stage PP-1 -> PP on one rank
            self.local[key] = tensor
            return
        self.pending_sends.append((self._p2p(dst, send=tensor), tensor))

    def post(self, key: tuple[str, simulate.MicroStage], src: int) -> Arrival:
        """Post the receive of `key` from `src` (and of what `src` sends before it) without waiting;
        the returned function waits for it (under NCCL: the current stream waits) and returns it."""
        if src == self.rank:
            return lambda: self.local.pop(key)
        queue = self.expected[src]
        while key not in self.posted:
            if not queue:
                raise RuntimeError(f"pipeline rank {self.rank} waits for {key} that rank {src} never sends")
            expected = queue.pop(0)
            buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self.posted[expected] = (buffer, self._p2p(src, recv=buffer))
        buffer, requests = self.posted.pop(key)

        def arrive() -> torch.Tensor:
            for request in requests:
                request.wait()
            return buffer

        return arrive

    def recv(self, key: tuple[str, simulate.MicroStage], src: int) -> torch.Tensor:
        return self.post(key, src)()

    def finish(self) -> None:
        for requests, _ in self.pending_sends:
            for request in requests:
                request.wait()
        self.pending_sends.clear()


def forward_steps(runner: StageRunner, mb: int,
                  arrival: Arrival) -> tuple[list[Step], Callable[[], Optional[torch.Tensor]]]:
    """A stage's forward as steps, and a function giving its output once they ran."""
    if hasattr(runner, "forward_steps"):
        return runner.forward_steps(mb, arrival)
    output = {}
    return [Step(COMPUTE, lambda: output.update(y=runner.forward(mb, arrival())), "forward")], lambda: output["y"]


def backward_steps(runner: StageRunner, mb: int, arrival: Arrival,
                   split: bool) -> tuple[list[Step], Callable[[], Optional[torch.Tensor]]]:
    """A stage's backward as steps, and a function giving its input's gradient once they ran."""
    if hasattr(runner, "backward_steps"):
        return runner.backward_steps(mb, arrival, split)
    input_grad = {}
    return ([Step(COMPUTE, lambda: input_grad.update(dx=runner.backward(mb, arrival(), split)), "backward")],
            lambda: input_grad["dx"])


def run_ops(op_lists: simulate.OpLists, rank: int, runners: dict[int, StageRunner], transport: Transport,
            on_op: Optional[Callable[[simulate.Op], None]] = None, streams: Optional[Streams] = None) -> None:
    """Run pipeline rank `rank`'s operations of `op_lists` on its `runners` (by stage): each
    forward receives its input from the previous stage's rank and sends its output on; each
    backward receives its output's gradient from the next stage's rank and sends the input's back.
    F&B runs its forward and backward interleaved (`overlap.run_pair`) where both runners are cut
    into pieces (`segmented`), else forward (and its send) first."""
    owner, last = owners(op_lists), op_lists.stages - 1
    streams = streams or Streams(transport.device)
    no_input: Arrival = lambda: None  # the first stage's forward input, the last stage's output gradient
    for op in op_lists.ranks[rank]:
        forward = backward = None
        if op.forward is not None:
            mb, stage = op.forward
            arrival = no_input if stage == 0 else transport.post(("F", (mb, stage - 1)), owner[mb, stage - 1])
            forward = forward_steps(runners[stage], mb, arrival)
        if op.kind in ("B", "BW", "F&B"):
            mb, stage = op.backward
            arrival = no_input if stage == last else transport.post(("B", (mb, stage + 1)), owner[mb, stage + 1])
            backward = backward_steps(runners[stage], mb, arrival, split=op.kind == "B")
        paired = forward and backward and all(getattr(runners[stage], "segmented", False)
                                              for _, stage in op.micro_stages)
        if paired:
            run_pair(forward[0], backward[0], streams)
        if forward:
            if not paired:
                run_chain(forward[0], streams)
            if op.forward[1] < last:
                transport.send(("F", op.forward), forward[1](), owner[op.forward[0], op.forward[1] + 1])
        if backward:
            if not paired:
                run_chain(backward[0], streams)
            if op.backward[1] > 0:
                transport.send(("B", op.backward), backward[1](), owner[op.backward[0], op.backward[1] - 1])
        if op.kind == "W":
            mb, stage = op.micro_stages[0]
            runners[stage].weight_grad(mb)
        if on_op is not None:
            on_op(op)
    transport.finish()


class ModelChunk:
    """A Megatron-style model chunk (`set_input_tensor`, called through `forward_step_func(data_iterator,
    chunk)` -> (output, loss_func)) as the `StageRunner` of model stage `stage` of `stages`. The last stage's
    loss is divided by the micro-batch count, as Megatron's schedules do; `losses` collects what
    its loss_func reports.

    `segmented`: `pieces.stage_pieces` can cut the chunk's model and `forward_step_func` takes
    `return_schedule_plan=True` (Megatron-Core's keyword for its own overlapped 1F1B), returning
    `StagePieces` in place of the output: then forward and backward run piece by piece
    (`overlap.Segmented`) and F&B pairs interleave."""

    def __init__(self, chunk: Any, stage: int, stages: int, forward_step_func: Callable, data: Iterator,
                 num_microbatches: int, streams: Optional[Streams] = None):
        self.chunk, self.stage, self.last = chunk, stage, stage == stages - 1
        self.forward_step_func, self.data, self.num_microbatches = forward_step_func, data, num_microbatches
        module = getattr(chunk, "module", chunk)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.streams = streams or Streams(torch.device("cpu"))
        self.segmented = (cuttable(module)
                          and "return_schedule_plan" in inspect.signature(forward_step_func).parameters)
        self.saved: dict[int, tuple[Optional[torch.Tensor], torch.Tensor, Optional[Segmented]]] = {}
        self.deferred: dict[int, Any] = {}
        self.losses: list[Any] = []

    def forward(self, mb: int, input_sbh: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        steps, output = self.forward_steps(mb, lambda: input_sbh)
        run_chain(steps, self.streams)
        return output()

    def backward(self, mb: int, output_grad: Optional[torch.Tensor], split: bool) -> Optional[torch.Tensor]:
        steps, input_grad = self.backward_steps(mb, lambda: output_grad, split)
        run_chain(steps, self.streams)
        return input_grad()

    def forward_steps(self, mb: int, arrival: Arrival) -> tuple[list[Step], Callable[[], Optional[torch.Tensor]]]:
        """Micro-batch `mb`'s forward as steps; `arrival` gives the stage input when the first runs."""
        tensors: dict[str, Any] = {}  # the stage input x and output y, once the steps ran

        def receive(segmented: Optional[Segmented] = None) -> None:
            received = arrival()
            x = None if received is None else received.detach().requires_grad_()
            if segmented is not None and x is not None:
                segmented.external.append(x)
            tensors["x"] = x
            self.chunk.set_input_tensor([x])

        def finish(output: Any, loss_func: Callable, segmented: Optional[Segmented]) -> None:
            if self.last:  # loss_func gives (loss, report) or, in newer Megatron releases, (loss, tokens, report)
                result = loss_func(output)
                self.losses.append(result[-1])
                self.saved[mb] = (tensors["x"], result[0] / self.num_microbatches, segmented)
                tensors["y"] = None
            else:
                self.saved[mb] = (tensors["x"], output, segmented)
                tensors["y"] = output.detach()

        if not self.segmented:
            def run() -> None:
                receive()
                finish(*self.forward_step_func(self.data, self.chunk), None)

            return [Step(COMPUTE, run, "forward")], lambda: tensors["y"]
        stage_pieces, loss_func = self.forward_step_func(self.data, self.chunk, return_schedule_plan=True)
        segmented = Segmented(stage_pieces, self.streams)
        steps = segmented.forward_steps(lambda: receive(segmented), lambda output: finish(output, loss_func, segmented))
        return steps, lambda: tensors["y"]

    def backward_steps(self, mb: int, arrival: Arrival, split: bool) -> tuple[list[Step], Callable[[], Optional[torch.Tensor]]]:
        """Micro-batch `mb`'s backward as steps; `arrival` gives its output's gradient (None on the
        last stage). `split`: the weight gradients wait for `weight_grad`."""
        x, y, segmented = self.saved.pop(mb)
        input_grad: dict[str, Any] = {}

        def root() -> tuple[torch.Tensor, Optional[torch.Tensor]]:
            grad = arrival()
            return y, None if grad is None else grad.to(y.dtype)

        if segmented is None:
            def run() -> None:
                input_grad["dx"] = self._backward_whole(mb, x, *root(), split)

            return [Step(COMPUTE, run, "backward")], lambda: input_grad["dx"]
        if split:
            self.deferred[mb] = segmented
        steps = segmented.backward_steps(root, self.params, split,
                                         lambda: input_grad.update(dx=None if x is None else segmented.input_grad(x)))
        return steps, lambda: input_grad["dx"]

    def _backward_whole(self, mb: int, x: Optional[torch.Tensor], y: torch.Tensor, grad: Optional[torch.Tensor],
                        split: bool) -> Optional[torch.Tensor]:
        if not split:
            torch.autograd.backward(y, grad)
            return None if x is None else x.grad
        self.deferred[mb] = (y, grad)
        if x is None:
            return None
        (dx,) = torch.autograd.grad(y, x, grad, retain_graph=True)
        return dx

    def weight_grad(self, mb: int) -> None:
        deferred = self.deferred.pop(mb)
        if isinstance(deferred, Segmented):
            deferred.weight_grad()
        else:
            torch.autograd.backward(deferred[0], deferred[1], inputs=self.params)


def make_forward_backward(schedule: Schedule) -> ForwardBackward:
    """The executor of `schedule` (DUALPIPE or DUALPIPEV): a forward/backward function called as
    the result of Megatron-Core's `get_forward_backward_func()` is."""

    def forward_backward(*, forward_step_func: Callable, data_iterator, model: list, num_microbatches: int,
                         seq_length: int, micro_batch_size: int, decoder_seq_length: Optional[int] = None,
                         forward_only: bool = False, collect_non_loss_data: bool = False,
                         first_val_step: Optional[bool] = None, adjust_tensor_shapes_fn: Optional[Callable] = None,
                         p2p_communicator=None, pg_collection=None, force_all_reduce: Optional[bool] = False) -> list:
        """One step over `num_microbatches` micro-batches; `model` is this rank's two chunks in
        `schedule.rank_stages` order. Returns what the last stage's loss_func reported per
        micro-batch. The keywords are those Megatron-Core 0.16-0.19 pass to a schedule; any other
        is refused by name (TypeError). Not used here: first_val_step (validation only),
        p2p_communicator and pg_collection (the pipeline group is `groups.pp_group()`), and
        force_all_reduce (the optimizer reduces the gradients)."""
        if forward_only and not schedule.forward_only:
            evaluating = [name for name in registry.names("schedule") if get(name).forward_only]
            raise ValueError(f"parallel.schedule={schedule.name!r} trains only (forward_only=True is not supported): "
                             f"evaluate with {' or '.join(evaluating)}")
        if adjust_tensor_shapes_fn is not None or decoder_seq_length not in (None, seq_length):
            raise ValueError(f"{schedule.name} sends [seq_length, micro_batch_size, hidden] tensors only: "
                             f"adjust_tensor_shapes_fn={adjust_tensor_shapes_fn!r} and decoder_seq_length="
                             f"{decoder_seq_length!r} (seq_length {seq_length}) are not supported")
        group = groups.pp_group()
        pp, rank = groups.size(group), groups.rank(group)
        model = model if isinstance(model, list) else [model]
        stages = schedule.rank_stages(pp, rank)
        if len(model) != len(stages):
            raise ValueError(f"{schedule.name}: rank {rank} needs its {len(stages)} model chunks (stages {stages}), "
                             f"got {len(model)}")
        op_lists = schedule.op_lists(pp, num_microbatches)
        order = {s: [op.forward[0] for op in op_lists.ranks[rank] if op.forward is not None and op.forward[1] == s]
                 for s in stages}
        if isinstance(data_iterator, list):  # Megatron's virtual pipeline: one iterator per chunk
            data = dict(zip(stages, data_iterator))
        else:  # each micro-batch once, handed to each chunk in the order it runs them
            batches = [next(data_iterator) for _ in range(num_microbatches)]
            data = {s: iter([batches[mb] for mb in order[s]]) for s in stages}
        device = comm.device_of(group) if group is not None else torch.device("cpu")
        streams = Streams(device)
        total = schedule.num_stages(pp)
        runners = {s: ModelChunk(c, s, total, forward_step_func, data[s], num_microbatches, streams)
                   for s, c in zip(stages, model)}
        config = model[0].config
        shape = (seq_length, micro_batch_size, config.hidden_size)
        dtype = getattr(config, "pipeline_dtype", None) or torch.float32
        run_ops(op_lists, rank, runners, Transport(op_lists, rank, group, shape, dtype, device), streams=streams)
        return [loss for runner in runners.values() for loss in runner.losses]

    forward_backward.__name__ = forward_backward.__qualname__ = f"{schedule.name}_forward_backward"
    return forward_backward


def _two_ranks(name: str, pipeline: int) -> None:
    if pipeline < 2:
        raise ScheduleRefused(f"{name} needs at least 2 pipeline ranks, got {pipeline}")


def _two_per_rank(name: str, pipeline: int, micro_batches: int) -> None:
    if micro_batches < 2 * pipeline:
        raise ScheduleRefused(f"{name} needs at least 2 x PP = {2 * pipeline} micro-batches per step, got "
                              f"{micro_batches}")


def dualpipe_rule(pipeline: int, micro_batches: int) -> None:
    """DualPipe: an even pipeline of >= 2 ranks; an even number of micro-batches, >= 2 PP (half
    enter at each end, and each end needs PP of them to fill the pipe)."""
    _two_ranks("dualpipe", pipeline)
    if pipeline % 2:
        raise ScheduleRefused(f"dualpipe needs an even number of pipeline ranks, got {pipeline}")
    _two_per_rank("dualpipe", pipeline, micro_batches)
    if micro_batches % 2:
        raise ScheduleRefused(f"dualpipe needs an even number of micro-batches per step, got {micro_batches}")


def dualpipev_rule(pipeline: int, micro_batches: int) -> None:
    """DualPipeV: >= 2 pipeline ranks and >= 2 PP micro-batches (one per stage of its V)."""
    _two_ranks("dualpipev", pipeline)
    _two_per_rank("dualpipev", pipeline, micro_batches)


def dual_bubble(stages: int, c: simulate.Costs) -> float:
    """The report's bubble of DualPipe and DualPipeV over `stages` stages: (PP/2 - 1)(F&B + B - 3W)."""
    return (stages // 2 - 1) * (c.fb + c.b - 3 * c.w)


# DualPipe on PP ranks: rank r holds stage r (micro-batches entering at rank 0) and stage PP-1-r
# (those entering at rank PP-1), so every stage lives on two ranks.
DUALPIPE = register(Schedule(
    "dualpipe", executor=lambda: make_forward_backward(DUALPIPE), build_ops=simulate.dualpipe,
    stages_per_rank=2, model_copies=2, rank_stages=lambda pipeline, rank: (rank, pipeline - 1 - rank),
    micro_batch_rule=dualpipe_rule, side_streams=True, report_bubble=dual_bubble))

# DualPipeV on PP ranks: 2 PP stages in a V, rank r holds stage r and 2PP-1-r; no copies.
DUALPIPEV = register(Schedule(
    "dualpipev", executor=lambda: make_forward_backward(DUALPIPEV),
    build_ops=lambda pipeline, micro_batches: simulate.dualpipev(2 * pipeline, micro_batches),
    stages_per_rank=2, rank_stages=lambda pipeline, rank: (rank, 2 * pipeline - 1 - rank),
    micro_batch_rule=dualpipev_rule, side_streams=True, report_bubble=dual_bubble))


def mark_mirror_copies(model: torch.nn.Module, copy: int) -> None:
    """Tag every tensor of a DualPipe rank's model with which copy of its stages it is (0 on pipeline
    ranks < PP/2, 1 on their mirrors): copy 1 is not counted in the gradient norm nor saved."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.mirror_copy = copy
