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
module on this rank, wrapped or not: `set_input_tensor` and `config` are reached through
Megatron's DDP / Float16Module as Megatron's own schedules reach them) through `forward_step_func`
and Megatron-Core's `forward_step_calc_loss`. Before the first operation chunks that tell their
stage are put in the schedule's order (`in_stage_order`: Megatron-LM's `get_model` builds them in
its own), and the order is checked (`check_chunk_order`). Data: one iterator for the rank, each
micro-batch handed to each chunk in the order it runs them; or Megatron's one per chunk, each over
all the step's micro-batches, read in that order (`InMicroBatchOrder`).

B and W (zero-bubble): a "B" op computes the gradient of the stage's input, which the previous
stage waits for, while the weight-gradient GEMMs of the model's linears, FP8 GEMMs and routed
experts go to a `WeightGradStore` with their inputs and output gradients
(`weight_grad_store.py`, as DeepSeek's reference does); B frees the micro-batch's graph (norms,
the embedding and the router get their gradients there). The "W" op runs the store and hands each
weight gradient to the weight's autograd edge, so Megatron's DDP hooks see it as they would see
autograd's. A chunk with none of these GEMMs (a model of other layers) splits by retaining its
graph for W instead. Under full recomputation B is whole and W empty: the store would keep what
the recomputation frees.

Memory, as Megatron's `deallocate_output_tensor` and DeepSeek's `_free_tensors` free it: after a
forward a chunk keeps the stage input and its output's graph edge; the output's data lives only
as long as its send (`Transport`). Forward-only (evaluation, `forward_only=True`): each rank's
forwards in the schedule's order (`simulate.forwards`, which cannot deadlock where the schedule
does not), under torch.no_grad, keeping nothing; the return value is Megatron's: on the last
pipeline rank each micro-batch's loss report, in order (`on_last_rank`).

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
needs, and waited only where the data is used (`Transport.post`). Sends are non-blocking; each is
dropped, with the tensor it sent, once it reports completion (a query) or once a message from the
peer shows that the peer has posted its receive (`send_releases`: a wait that returns at once;
gloo reports a send complete only when waited); the rest are waited at the end of the step.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
from typing import Any, Callable, Iterator, Optional, Protocol, Union

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel.p2p_communication import _batched_p2p_ops
from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_attr_wrapped_model
from torch.autograd.graph import GradientEdge, get_gradient_edge

from megatron_dsv3.parallel import comm, groups
from megatron_dsv3.pipeline import simulate
from megatron_dsv3.pipeline.overlap import Segmented, Step, Streams, run_chain, run_pair
from megatron_dsv3.pipeline.pieces import COMPUTE, cuttable
from megatron_dsv3.pipeline.schedule import ForwardBackward, Schedule, ScheduleRefused, register
from megatron_dsv3.weight_grad_store import WeightGradStore, can_defer

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


Message = tuple[str, simulate.MicroStage]  # ("F", (mb, s)): stage s's output; ("B", (mb, s)): its input's gradient


def sends(op_lists: simulate.OpLists, src: int, dst: int) -> list[tuple[Message, int]]:
    """What pipeline rank `src` sends to `dst`, in its order, each with the index of the op that sends
    it: ("F", (mb, s)) the output of stage s (for stage s+1), ("B", (mb, s)) the input gradient of
    stage s (for stage s-1)."""
    owner, last, sent = owners(op_lists), op_lists.stages - 1, []
    for index, op in enumerate(op_lists.ranks[src]):
        if op.forward is not None and op.forward[1] < last and owner[op.forward[0], op.forward[1] + 1] == dst:
            sent.append((("F", op.forward), index))
        if op.kind in ("B", "BW", "F&B") and op.backward[1] > 0 and owner[op.backward[0], op.backward[1] - 1] == dst:
            sent.append((("B", op.backward), index))
    return sent


def messages(op_lists: simulate.OpLists, src: int, dst: int) -> list[Message]:
    """What pipeline rank `src` sends to `dst`, in its order."""
    return [message for message, _ in sends(op_lists, src, dst)]


def receives_posted(op_lists: simulate.OpLists, src: int, dst: int) -> dict[Message, int]:
    """The op of `dst` at whose start its `Transport` posts the receive of each message from `src`:
    the first op that needs it or a later one of `src`'s (receives are posted in the sender's order)."""
    owner, last, rank_of = owners(op_lists), op_lists.stages - 1, {}
    queue = messages(op_lists, src, dst)
    for index, op in enumerate(op_lists.ranks[dst]):
        needed = []
        if op.forward is not None and op.forward[1] > 0:
            needed.append(("F", (op.forward[0], op.forward[1] - 1)))
        if op.kind in ("B", "BW", "F&B") and op.backward[1] < last:
            needed.append(("B", (op.backward[0], op.backward[1] + 1)))
        for message in needed:
            if owner[message[1]] == src and message not in rank_of:
                while message not in rank_of:
                    rank_of[queue.pop(0)] = index
    return rank_of


def send_releases(op_lists: simulate.OpLists, rank: int) -> dict[Message, list[Message]]:
    """For each message `rank` receives, its own sends to that peer that have completed by the time it
    arrives: the peer sent it at or after the op where it posted their receives, so a wait on them
    returns at once (on any backend; gloo reports a send complete only once waited)."""
    release: dict[Message, list[Message]] = {}
    for peer in range(len(op_lists.ranks)):
        if peer == rank:
            continue
        posted, theirs = receives_posted(op_lists, rank, peer), sends(op_lists, peer, rank)
        for message in messages(op_lists, rank, peer):
            after = [key for key, index in theirs if index >= posted[message]]
            if after:
                release.setdefault(after[0], []).append(message)
    return release


class Transport:
    """Sends and receives of one rank over the pipeline group (see the module docstring)."""

    def __init__(self, op_lists: simulate.OpLists, rank: int, group: Optional[dist.ProcessGroup],
                 shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.op_lists, self.rank, self.group = op_lists, rank, group
        self.global_ranks = dist.get_process_group_ranks(group) if group is not None else [0]
        self.shape, self.dtype, self.device = shape, dtype, device
        self.expected = {src: messages(op_lists, src, rank) for src in range(len(op_lists.ranks)) if src != rank}
        self.releases = send_releases(op_lists, rank)
        self.posted: dict[Message, tuple[torch.Tensor, list]] = {}
        self.local: dict[Message, torch.Tensor] = {}
        self.pending_sends: dict[Message, tuple[list, torch.Tensor]] = {}  # sent, not yet known complete

    def _p2p(self, peer: int, send: Optional[torch.Tensor] = None, recv: Optional[torch.Tensor] = None) -> list:
        peer = self.global_ranks[peer]
        return _batched_p2p_ops(tensor_send_prev=None, tensor_recv_prev=None, tensor_send_next=send,
                                tensor_recv_next=recv, group=self.group, prev_pipeline_rank=peer,
                                next_pipeline_rank=peer)

    def send(self, key: Message, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.detach().to(self.dtype).contiguous()
        if dst == self.rank:  # DualPipeV's turn of the V: stage PP-1 -> PP on one rank
            self.local[key] = tensor
            return
        self.release_completed()
        self.pending_sends[key] = (self._p2p(dst, send=tensor), tensor)

    def release_completed(self) -> None:
        """Drop the sends that report completion, and with them the last reference to what they
        sent (a query of each request's state: no wait, and no host sync under NCCL)."""
        for key in [key for key, (requests, _) in self.pending_sends.items()
                    if all(request.is_completed() for request in requests)]:
            del self.pending_sends[key]

    def _arrived(self, key: Message) -> None:
        """`key` arrived: wait for (at once) and drop the sends it shows complete (`send_releases`)."""
        for sent in self.releases.get(key, ()):
            if sent in self.pending_sends:
                for request in self.pending_sends.pop(sent)[0]:
                    request.wait()

    def post(self, key: Message, src: int) -> Arrival:
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
            self._arrived(key)
            return buffer

        return arrive

    def recv(self, key: Message, src: int) -> torch.Tensor:
        return self.post(key, src)()

    def finish(self) -> None:
        for requests, _ in self.pending_sends.values():
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


# What Megatron-Core's forward_step_calc_loss reads of a chunk's config, for a chunk without one (a
# bare module): its defaults.
_MEGATRON_DEFAULTS = types.SimpleNamespace(timers=None, calculate_per_token_loss=False, grad_scale_func=None)

# Where a backward starts: a sent stage output's graph edge and its dtype (the tensor itself is
# freed), or the last stage's loss.
Root = Union[tuple[GradientEdge, torch.dtype], torch.Tensor]


class ModelChunk:
    """A Megatron-style model chunk (`set_input_tensor`, reached through wrappers as Megatron's
    schedules reach it, called through `forward_step_func(data_iterator, chunk)` -> (output,
    loss_func)) as the `StageRunner` of model stage `stage` of `stages`. Each output goes through
    Megatron-Core's `forward_step_calc_loss`, as in its own schedules: on the last stage the loss is
    divided by the micro-batch count (or the token count), and `reports` collects, per micro-batch,
    what loss_func reported (with `collect_non_loss_data`, what it returns for
    `non_loss_data=True`); the MoE and MTP auxiliary-loss scales are set.

    Training keeps, per micro-batch until its backward, the stage input and the output's graph edge:
    the output's data is freed once sent, as Megatron's `deallocate_output_tensor` does. A split
    backward (B) defers the weight GEMMs to a `WeightGradStore` and frees the graph; `weight_grad`
    (W) runs the store. A chunk none of whose GEMMs can defer (no `Linear` of this project: a model
    of other layers) splits by retaining its graph for W instead, unless it is a Megatron-Core model
    (a `MegatronModule`, whose backward must run once): then B runs the whole backward. A chunk that
    recomputes fully (`recompute: full`, Megatron's `recompute_granularity="full"`) does not split
    either: B is whole, W empty.

    `forward_only`: no graph, nothing kept (evaluation, under torch.no_grad).

    `segmented`: `pieces.stage_pieces` can cut the chunk's model and `forward_step_func` takes
    `return_schedule_plan=True` (Megatron-Core's keyword for its own overlapped 1F1B), returning
    `StagePieces` in place of the output: then forward and backward run piece by piece
    (`overlap.Segmented`) and F&B pairs interleave."""

    def __init__(self, chunk: Any, stage: int, stages: int, forward_step_func: Callable, data: Iterator,
                 num_microbatches: int, streams: Optional[Streams] = None, forward_only: bool = False,
                 collect_non_loss_data: bool = False):
        self.chunk, self.stage, self.last = chunk, stage, stage == stages - 1
        self.forward_step_func, self.data, self.num_microbatches = forward_step_func, data, num_microbatches
        self.forward_only, self.collect_non_loss_data = forward_only, collect_non_loss_data
        self.set_input_tensor = get_attr_wrapped_model(chunk, "set_input_tensor")
        self.config = _wrapped_attr(chunk, "config") or _MEGATRON_DEFAULTS
        module = chunk
        while hasattr(module, "module"):  # the model under its wrappers (ScheduledModel, DDP, Float16Module)
            module = module.module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.defers = isinstance(module, torch.nn.Module) and can_defer(module)
        # Under full recomputation a deferred W would keep every GEMM's input and output gradient
        # from B to W, what the recomputation exists not to keep (a middle rank of the 671B example
        # holds 8 such W's at once: 60 GiB in its rehearsal). There B takes the weight gradients too.
        self.splits = not (getattr(module, "recompute", None) == "full"
                           or getattr(self.config, "recompute_granularity", None) == "full")
        # A chunk that cannot defer its GEMMs splits by retaining its graph and walking it twice, unless it
        # is a Megatron-Core model (MegatronModule), whose backward must run once (Megatron's fused
        # cross-entropy overwrites what it saved; gradient-accumulation fusion adds dW to main_grad
        # during B): then B is the whole backward and W has nothing left.
        self.retains = not self.defers and not (isinstance(module, torch.nn.Module) and any(
            isinstance(m, MegatronModule) for m in module.modules()))
        self.streams = streams or Streams(torch.device("cpu"))
        self.segmented = (not forward_only and cuttable(module)
                          and "return_schedule_plan" in inspect.signature(forward_step_func).parameters)
        self.saved: dict[int, tuple[Optional[torch.Tensor], Root, Optional[Segmented]]] = {}
        self.deferred: dict[int, Callable[[], None]] = {}  # micro-batch -> its W
        self.reports: list[tuple[int, Any]] = []  # (micro-batch, what loss_func reported) on the last stage
        self.token_counts: list[torch.Tensor] = []  # loss_func's token counts (Megatron's 3-tuple), last stage

    @property
    def losses(self) -> list[Any]:
        """What loss_func reported, in the order the micro-batches ran."""
        return [report for _, report in self.reports]

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
            if self.config.timers is not None:  # stopped in forward_step_calc_loss, as Megatron's forward_step does
                self.config.timers("forward-compute", log_level=2).start()
            received = arrival()
            x = None if received is None or self.forward_only else received.detach().requires_grad_()
            if segmented is not None and x is not None:
                segmented.external.append(x)
            tensors["x"] = x
            self.set_input_tensor([received if self.forward_only else x])

        def finish(output: Any, loss_func: Callable, segmented: Optional[Segmented]) -> None:
            reported: list[Any] = []
            output, num_tokens = forward_step_calc_loss(
                self.chunk, output, loss_func, self.config, None, self.collect_non_loss_data, self.num_microbatches,
                reported, cp_group_size=1, is_last_stage=self.last)
            self.reports += [(mb, report) for report in reported]
            if self.last:
                self.token_counts.append(num_tokens)
            tensors["y"] = None if self.last else output.detach()
            if self.forward_only:
                return
            if self.last:
                if self.config.grad_scale_func is not None:  # as Megatron's backward_step scales the loss
                    output = self.config.grad_scale_func(output)
                self.saved[mb] = (tensors["x"], output, segmented)
            else:  # keep what autograd needs of the output, not its data
                self.saved[mb] = (tensors["x"], (get_gradient_edge(output), output.dtype), segmented)

        if not self.segmented:
            def run() -> None:
                receive()
                finish(*self.forward_step_func(self.data, self.chunk), None)

            return [Step(COMPUTE, run, "forward")], lambda: tensors["y"]
        stage_pieces, loss_func = self.forward_step_func(self.data, self.chunk, return_schedule_plan=True)
        segmented = Segmented(stage_pieces, self.streams)
        loss_func = _scalable(loss_func)
        steps = segmented.forward_steps(lambda: receive(segmented), lambda output: finish(output, loss_func, segmented))
        return steps, lambda: tensors["y"]

    def backward_steps(self, mb: int, arrival: Arrival, split: bool) -> tuple[list[Step], Callable[[], Optional[torch.Tensor]]]:
        """Micro-batch `mb`'s backward as steps; `arrival` gives its output's gradient (None on the
        last stage). `split`: the weight gradients wait for `weight_grad` (unless the chunk
        recomputes fully: `splits`)."""
        x, root, segmented = self.saved.pop(mb)
        split = split and self.splits
        input_grad: dict[str, Any] = {}

        def start() -> tuple[torch.Tensor | GradientEdge, Optional[torch.Tensor]]:
            grad = arrival()
            if isinstance(root, torch.Tensor):  # the last stage's loss
                return root, grad
            edge, dtype = root
            return edge, grad.to(dtype)

        if segmented is None:
            def run() -> None:
                input_grad["dx"] = self._backward_whole(mb, x, *start(), split)

            return [Step(COMPUTE, run, "backward")], lambda: input_grad["dx"]
        if split:
            self.deferred[mb] = segmented.weight_grad
        steps = segmented.backward_steps(start, self.params, split,
                                         lambda: input_grad.update(dx=None if x is None else segmented.input_grad(x)))
        return steps, lambda: input_grad["dx"]

    def _backward_whole(self, mb: int, x: Optional[torch.Tensor], root: torch.Tensor | GradientEdge,
                        grad: Optional[torch.Tensor], split: bool) -> Optional[torch.Tensor]:
        if split and self.retains:  # W walks the retained graph
            self.deferred[mb] = functools.partial(torch.autograd.backward, root, grad, inputs=self.params)
            return None if x is None else torch.autograd.grad(root, x, grad, retain_graph=True)[0]
        store = WeightGradStore()
        with store.collecting() if split and self.defers else contextlib.nullcontext():
            torch.autograd.backward(root, grad)
        if split:
            self.deferred[mb] = store.flush
        return None if x is None else x.grad

    def weight_grad(self, mb: int) -> None:
        if self.splits:  # otherwise B took them
            self.deferred.pop(mb)()


def _scalable(loss_func: Optional[Callable]) -> Optional[Callable]:
    """`loss_func` whose loss Megatron-Core may scale in place: the pieces' output reads the state
    through views that autograd forbids modifying (`overlap._Cut`), so the loss is copied (a scalar)."""
    if loss_func is None:
        return None

    def scalable(output: Any, *args: Any, **kwargs: Any) -> Any:
        result = loss_func(output, *args, **kwargs)
        if kwargs.get("non_loss_data") or not isinstance(result, tuple):
            return result
        return (result[0].clone(), *result[1:])

    return scalable


def _wrapped_attr(chunk: Any, name: str) -> Any:
    """`name` of `chunk` or of the module it wraps (Megatron's DDP, Float16Module), else None."""
    try:
        return get_attr_wrapped_model(chunk, name)
    except RuntimeError:
        return None


def check_chunk_order(schedule: Schedule, pipeline: int, rank: int, model: list) -> None:
    """Refuse, before any operation, chunks that are not in `schedule.rank_stages` order, where the
    chunks tell which stage they run: a `stage` attribute (dsv3-train's `ScheduledModel`), Megatron's
    `pre_process` (the first stage: it embeds the tokens) and `post_process` (the last: the loss)."""
    stages, last = schedule.rank_stages(pipeline, rank), schedule.num_stages(pipeline) - 1
    if len(model) != len(stages):
        raise ValueError(f"{schedule.name}: rank {rank} needs its {len(stages)} model chunks (stages {stages}), "
                         f"got {len(model)}")
    for index, (chunk, stage) in enumerate(zip(model, stages)):
        expected = {"stage": stage, "pre_process": stage == 0, "post_process": stage == last}
        told = {name: value for name in expected if (value := _wrapped_attr(chunk, name)) is not None}
        wrong = [f"{name}={told[name]!r}" for name in told if told[name] != expected[name]]
        if wrong:
            should = ", ".join(f"{name}={expected[name]!r}" for name in told)
            raise ValueError(f"{schedule.name}: pipeline rank {rank} runs stages {stages} of 0..{last}, so its chunk "
                             f"{index} must run stage {stage} ({should}), but it has {', '.join(wrong)}: pass the "
                             f"rank's chunks in the order {stages}")


def in_stage_order(schedule: Schedule, pipeline: int, rank: int, model: list, data_iterator: Any) -> tuple[list, Any]:
    """`model` in `schedule.rank_stages` order, and Megatron's per-chunk data iterators (a list) with
    it, where every chunk tells its stage (a `stage` attribute) and they are this rank's stages in
    another order: Megatron-LM builds a rank's MTP stage as its last virtual chunk, so the builder of
    `megatron_dsv3.megatron_lm` gives DualPipe's ranks >= PP/2 their lower stage first. Otherwise
    both are returned as given (`check_chunk_order` judges them)."""
    stages = list(schedule.rank_stages(pipeline, rank))
    told = [_wrapped_attr(chunk, "stage") for chunk in model]
    if None in told or told == stages or sorted(told) != sorted(stages):
        return model, data_iterator
    picks = [told.index(stage) for stage in stages]
    if isinstance(data_iterator, list):
        data_iterator = [data_iterator[i] for i in picks]
    return [model[i] for i in picks], data_iterator


class InMicroBatchOrder:
    """One chunk's data iterator under Megatron's virtual pipeline, which yields every micro-batch
    of the step in order (0..M-1), read in the order the chunk runs its micro-batches (`order`):
    DualPipe's second direction starts at M/2, and each of its stages runs half of them. Batches
    read ahead wait for their turn; `finish` reads what is left of the step's M, where the chunk
    read any, so the next step starts at its first batch."""

    def __init__(self, iterator: Iterator, order: list[int], num_microbatches: int):
        self.iterator, self.order, self.num_microbatches = iterator, iter(order), num_microbatches
        self.ahead: dict[int, Any] = {}
        self.read = 0  # batches taken from `iterator` this step

    def __iter__(self) -> "InMicroBatchOrder":
        return self

    def __next__(self) -> Any:
        mb = next(self.order)
        while mb not in self.ahead:
            self.ahead[self.read] = next(self.iterator)
            self.read += 1
        return self.ahead.pop(mb)

    def finish(self) -> None:
        if self.read:
            for _ in range(self.read, self.num_microbatches):
                next(self.iterator)
        self.ahead.clear()


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {key: _map_tensors(value, fn) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        values = [_map_tensors(value, fn) for value in obj]
        return type(obj)(*values) if hasattr(obj, "_fields") else type(obj)(values)  # a namedtuple, or not
    return obj


def on_last_rank(reports: list[tuple[int, Any]], group: Optional[dist.ProcessGroup], device: torch.device) -> list:
    """Megatron-Core's return value: on the last pipeline rank every micro-batch's report in
    micro-batch order, elsewhere []. DualPipeV computes the loss on rank 0 and DualPipe on ranks 0
    and PP-1, so the reports travel there (their tensors through the host: one object gather over the
    pipeline group at the end of the step)."""
    pipeline, rank = groups.size(group), groups.rank(group)
    if pipeline > 1:
        sent = [(mb, _map_tensors(report, lambda t: t.detach().cpu())) for mb, report in reports]
        gathered = comm.all_gather_object([] if rank == pipeline - 1 else sent, group)
        if rank != pipeline - 1:
            return []
        reports = reports + [(mb, _map_tensors(report, lambda t: t.to(device))) for part in gathered for mb, report in part]
    return [report for _, report in sorted(reports, key=lambda item: item[0])]


def make_forward_backward(schedule: Schedule) -> ForwardBackward:
    """The executor of `schedule` (DUALPIPE or DUALPIPEV): a forward/backward function called as
    the result of Megatron-Core's `get_forward_backward_func()` is."""

    def forward_backward(*, forward_step_func: Callable, data_iterator, model: list, num_microbatches: int,
                         seq_length: int, micro_batch_size: int, decoder_seq_length: Optional[int] = None,
                         forward_only: bool = False, collect_non_loss_data: bool = False,
                         first_val_step: Optional[bool] = None, adjust_tensor_shapes_fn: Optional[Callable] = None,
                         p2p_communicator=None, pg_collection=None, force_all_reduce: Optional[bool] = False) -> list:
        """One step over `num_microbatches` micro-batches; `model` is this rank's two chunks in
        `schedule.rank_stages` order (wrapped or not). Returns, as Megatron-Core's schedules do, on
        the last pipeline rank what the last stage's loss_func reported per micro-batch, in order
        (`on_last_rank`), and [] on the others. Training ends with the chunks' config's
        `finalize_model_grads_func`, where one is set (Megatron-LM's loop sets it).

        `forward_only` (evaluation): each rank's forwards in the schedule's order
        (`simulate.forwards`), under torch.no_grad, keeping no graph and no output;
        `collect_non_loss_data` (with it): loss_func(output, non_loss_data=True) is reported.

        The keywords are those Megatron-Core 0.16-0.19 pass to a schedule; any other is refused by
        name (TypeError). Not used here: first_val_step (Transformer Engine's FP8 weight caching),
        p2p_communicator (the pipeline group is `groups.pp_group()`)."""
        if adjust_tensor_shapes_fn is not None or decoder_seq_length not in (None, seq_length):
            raise ValueError(f"{schedule.name} sends [seq_length, micro_batch_size, hidden] tensors only: "
                             f"adjust_tensor_shapes_fn={adjust_tensor_shapes_fn!r} and decoder_seq_length="
                             f"{decoder_seq_length!r} (seq_length {seq_length}) are not supported")
        if collect_non_loss_data and not forward_only:
            raise ValueError(f"{schedule.name}: collect_non_loss_data=True needs forward_only=True (it reports "
                             "data, not a loss to train on)")
        group = groups.pp_group()
        pp, rank = groups.size(group), groups.rank(group)
        model = model if isinstance(model, list) else [model]
        model, data_iterator = in_stage_order(schedule, pp, rank, model, data_iterator)
        check_chunk_order(schedule, pp, rank, model)
        config = get_attr_wrapped_model(model[0], "config")
        if getattr(config, "context_parallel_size", 1) > 1:
            raise ValueError(f"{schedule.name} does not support context parallelism (context_parallel_size="
                             f"{config.context_parallel_size})")
        op_lists = schedule.op_lists(pp, num_microbatches)
        if forward_only:
            op_lists = simulate.forwards(op_lists)
        stages = schedule.rank_stages(pp, rank)
        order = {s: [op.forward[0] for op in op_lists.ranks[rank] if op.forward is not None and op.forward[1] == s]
                 for s in stages}
        if isinstance(data_iterator, list):  # Megatron's virtual pipeline: one iterator per chunk
            data = {s: None if it is None else InMicroBatchOrder(it, order[s], num_microbatches)
                    for s, it in zip(stages, data_iterator)}
        else:  # each micro-batch once, handed to each chunk in the order it runs them
            batches = [next(data_iterator) for _ in range(num_microbatches)]
            data = {s: iter([batches[mb] for mb in order[s]]) for s in stages}
        device = comm.device_of(group) if group is not None else torch.device("cpu")
        streams = Streams(device)
        total = schedule.num_stages(pp)
        runners = {s: ModelChunk(c, s, total, forward_step_func, data[s], num_microbatches, streams,
                                 forward_only=forward_only, collect_non_loss_data=collect_non_loss_data)
                   for s, c in zip(stages, model)}
        shape = (seq_length, micro_batch_size, config.hidden_size)
        dtype = getattr(config, "pipeline_dtype", None) or torch.float32
        with torch.no_grad() if forward_only else contextlib.nullcontext():
            run_ops(op_lists, rank, runners, Transport(op_lists, rank, group, shape, dtype, device), streams=streams)
        for chunk_data in data.values():
            if isinstance(chunk_data, InMicroBatchOrder):
                chunk_data.finish()
        if not forward_only and getattr(config, "finalize_model_grads_func", None) is not None:
            num_tokens = None
            if config.calculate_per_token_loss:  # Megatron reads it on the last pipeline rank: every rank sums
                counts = [count.to(device) for r in runners.values() for count in r.token_counts]
                num_tokens = comm.all_reduce(sum(counts, torch.zeros((), dtype=torch.int, device=device)), group)
            config.finalize_model_grads_func(model, num_tokens, pg_collection=pg_collection,
                                             force_all_reduce=force_all_reduce)
        return on_last_rank([item for runner in runners.values() for item in runner.reports], group, device)

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
    micro_batch_rule=dualpipe_rule, forward_only=True, side_streams=True, report_bubble=dual_bubble))

# DualPipeV on PP ranks: 2 PP stages in a V, rank r holds stage r and 2PP-1-r; no copies.
DUALPIPEV = register(Schedule(
    "dualpipev", executor=lambda: make_forward_backward(DUALPIPEV),
    build_ops=lambda pipeline, micro_batches: simulate.dualpipev(2 * pipeline, micro_batches),
    stages_per_rank=2, rank_stages=lambda pipeline, rank: (rank, 2 * pipeline - 1 - rank),
    micro_batch_rule=dualpipev_rule, forward_only=True, side_streams=True, report_bubble=dual_bubble))


def mark_mirror_copies(model: torch.nn.Module, copy: int) -> None:
    """Tag every tensor of a DualPipe rank's model with which copy of its stages it is (0 on pipeline
    ranks < PP/2, 1 on their mirrors): copy 1 is not counted in the gradient norm nor saved."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.mirror_copy = copy
