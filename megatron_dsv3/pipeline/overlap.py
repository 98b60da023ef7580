"""The overlapped forward-and-backward step of DualPipe (report section 3.2.1, Figure 4).

In DualPipe's steady phase each rank runs the forward of one micro-batch beside the backward of
another (an "F&B" operation). Both are cut into their pieces (`pieces.py`, an adapter that calls
the model's plain forward steps one at a time), and the two chains of pieces are issued
alternately so that one's communication runs behind the other's computation. For a pair of
DeepSeek-V3 MoE layers, forward of layer i and backward of layer j:

    compute stream                        communication stream
    attention+route F (i)                 combine B (j)      all-to-all of output gradients
    experts B + W (j)                     dispatch F (i)     all-to-all of tokens
    experts F (i)                         dispatch B (j)     all-to-all of input gradients
    merge+attention+route B + W (j)       combine F (i)      all-to-all of expert outputs

The head, the loss and MTP's pieces join the last stage's chains the same way (MTP's block is a
MoE layer of its own). Pipeline p2p: both receives are posted before the pair starts and each
chain waits for its own at its first piece; sends are non-blocking and complete behind the next
operation (`dualpipe.Transport`).

On CUDA the communication pieces run on a second stream; each chain orders its own pieces with
an event, so the two chains only meet where the table puts them side by side. The one host read
in a piece is dispatch's split sizes (counts exchanged first); the compute piece beside it is
issued before it, so the GPU is busy while the host waits. On CPU the same order runs on one
stream, without overlap: the losses of the plain forward bit for bit, its gradients up to the
order in which a value's gradients from several readers are summed.

Each piece's autograd graph is cut at what it reads (`_Cut`, `Segmented`): backward walks the
pieces in reverse, taking the gradient of each piece's inputs (B) and, at once or deferred, of its
weights (W). A deferred W keeps only what its weight GEMMs need (`weight_grad_store.py`): B frees
each piece's graph as the plain backward does. The cuts keep no tensor alive: activations live as
long as autograd saves them, as in the plain forward (`tests/test_overlap.py` checks it).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from megatron_dsv3.pipeline.pieces import COMM, COMPUTE, Piece, StagePieces, fuse
from megatron_dsv3.weight_grad_store import WeightGradStore

Root = Callable[[], tuple[torch.Tensor | GradientEdge, Optional[torch.Tensor]]]


@dataclass
class Step:
    kind: str  # COMPUTE or COMM: the stream it runs on
    run: Callable[[], None]
    name: str = ""


class _Cut(torch.autograd.Function):
    """A piece's view of a state value, where its autograd graph stops: the backward hands the
    gradient to `sink` and goes no further. The graph reaches only `anchor` (a scalar that needs a
    gradient) through it, so it keeps neither the value nor anything upstream alive."""

    @staticmethod
    def forward(ctx, value, anchor, sink):
        ctx.sink = sink
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        ctx.sink(grad)
        return None, None, None


def _accumulate(grads: dict[int, torch.Tensor], serial: int, grad: torch.Tensor) -> None:
    grads[serial] = grad if serial not in grads else grads[serial] + grad


class _Inputs(Mapping):
    """The state as one piece sees it: each tensor that needs a gradient is replaced, on first
    read, by a `_Cut` of it whose gradient is summed into `grads` under the value's serial."""

    def __init__(self, segmented: "Segmented", stream: Optional[torch.cuda.Stream]):
        self.state, self.serials, self.stream = segmented.state, segmented.serials, stream
        self.anchor, self.grads = segmented.anchor, segmented.grads
        self.cuts: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> Any:
        value = self.state[key]
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            return value
        if key not in self.cuts:
            if self.stream is not None and value.is_cuda:
                value.record_stream(self.stream)  # produced on the other stream, read on this one
            sink = functools.partial(_accumulate, self.grads, self.serials[key])
            self.cuts[key] = _Cut.apply(value.detach(), self.anchor, sink)
        return self.cuts[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


@dataclass
class _Record:
    piece: Piece
    outputs: list[tuple[GradientEdge, int]]  # what it wrote that carries a gradient: (its graph edge, its serial)


class Streams:
    """A compute and a communication stream on CUDA; nothing (one implicit stream) elsewhere."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.comm = torch.cuda.Stream(device)

    def stream(self, kind: str) -> Optional[torch.cuda.Stream]:
        return None if not self.cuda else (self.comm if kind == COMM else self.compute)

    def chain(self) -> Optional[torch.cuda.Event]:
        """An event ordering one chain's steps, starting after what the compute stream holds now."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.compute)
        return event

    def run(self, step: Step, chain: Optional[torch.cuda.Event]) -> None:
        if not self.cuda:
            step.run()
            return
        stream = self.stream(step.kind)
        stream.wait_event(chain)
        with torch.cuda.stream(stream):
            step.run()
        chain.record(stream)

    def join(self, chains: list[Optional[torch.cuda.Event]]) -> None:
        """The compute stream waits for every chain's last step."""
        if self.cuda:
            for event in chains:
                self.compute.wait_event(event)


class Segmented:
    """One micro-batch's pass through one stage, piece by piece: forward steps now, backward
    steps (input gradients, and weight gradients unless deferred to `weight_grad`) later.

    Each piece's graph starts at `_Cut`s of what it read and ends at what it wrote; records keep
    only the graph edges of the outputs, so activations live exactly as long as autograd saves
    them (as in the plain forward). A piece's backward runs its graph down to its cuts, which pass
    the gradients to the pieces that wrote those values. Split (B), the weight GEMMs go to `store`
    and the graph is freed as it goes; `weight_grad` (W) runs the store."""

    def __init__(self, stage_pieces: StagePieces, streams: Streams):
        self.stage_pieces, self.streams = stage_pieces, streams
        self.pieces = fuse(stage_pieces.pieces)
        self.state: dict[str, Any] = {}
        self.serials: dict[str, int] = {}  # key -> serial of the value the state holds under it
        self.numbering = itertools.count()
        self.grads: dict[int, torch.Tensor] = {}  # serial -> gradient summed over its readers
        self.anchor = torch.zeros((), device=streams.device, requires_grad=True)
        self.records: list[_Record] = []
        self.output: Any = None
        self.output_read = False  # whether the output read a cut (the seed then runs)
        self.store = WeightGradStore()  # the weight GEMMs a split backward defers
        self.external: list[torch.Tensor] = []  # leaves the pieces read from outside the state (the stage input)

    def forward_steps(self, prologue: Callable[[], None], epilogue: Callable[[Any], None]) -> list[Step]:
        """The pieces as steps; `prologue` runs before the first (the stage input's arrival) and
        `epilogue(output)` after the last."""
        steps = [Step(piece.kind, lambda piece=piece: self._forward(piece), piece.name) for piece in self.pieces]
        return _framed(steps, prologue, lambda: epilogue(self._take_output()))

    def _take_output(self) -> Any:
        """The output, handed over once: the caller decides what of it to keep (a sent stage output
        is freed once sent, its graph edge kept)."""
        output, self.output = self.output, None
        return output

    def _forward(self, piece: Piece) -> None:
        inputs = _Inputs(self, self.streams.stream(piece.kind))
        with self.stage_pieces.context():
            written = piece.run(inputs)
        outputs = []
        for key, value in written.items():
            if isinstance(value, (list, tuple, dict)) and any(
                    isinstance(v, torch.Tensor) and v.requires_grad for v in (value.values() if isinstance(value, dict) else value)):
                raise TypeError(f"piece {piece.name!r} wrote {key!r}, a container of tensors that need gradients: "
                                "write each tensor under its own key, so that the cut between pieces sees it")
            self.serials[key] = serial = next(self.numbering)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                outputs.append((get_gradient_edge(value), serial))
        self.state.update(written)
        self.records.append(_Record(piece, outputs))
        if piece is self.pieces[-1]:  # the output reads the state through cuts of its own, as a piece would
            output_inputs = _Inputs(self, None)
            self.output = self.stage_pieces.output(output_inputs)
            self.output_read = bool(output_inputs.cuts)
            self.state.clear()  # from here on only autograd's saved tensors hold the activations

    def backward_steps(self, root: Root, params: list[torch.Tensor], split: bool,
                       epilogue: Callable[[], None]) -> list[Step]:
        """Steps from the last piece back to the first. `root()` gives where backward starts (the
        stage's output or its graph edge, or its loss) and its gradient (None for a scalar loss); it
        is a function of the output, without weights of its own. `split`: defer the weight GEMMs to
        `weight_grad`."""
        self._root, self._params, self._split = root, params, split
        steps = [Step(rec.piece.kind, lambda rec=rec: self._backward(rec), rec.piece.name)
                 for rec in reversed(self.records)]
        return _framed(steps, self._seed, lambda: (epilogue(), self.records.clear()))

    def _seed(self) -> None:
        """Gradients of the state values the output read, from the root (the output holds no weights)."""
        root, grad = self._root()
        if self.output_read:
            torch.autograd.backward(root, grad, inputs=[self.anchor])

    def _backward(self, rec: _Record) -> None:
        edges, grads = [], []
        for edge, serial in rec.outputs:
            g = self.grads.pop(serial, None)
            if g is not None:
                if self.streams.cuda:
                    g.record_stream(torch.cuda.current_stream())
                edges.append(edge)
                grads.append(g)
        if not edges:
            return
        inputs = [self.anchor, *self.external, *self._params]
        if self._split:
            with self.store.collecting():
                torch.autograd.backward(edges, grads, inputs=inputs)
        else:
            torch.autograd.backward(edges, grads, inputs=inputs)

    def input_grad(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """The gradient that reached `tensor`, one of `external`."""
        grad, tensor.grad = tensor.grad, None
        return grad

    def weight_grad(self) -> None:
        """The deferred weight GEMMs, every piece's, in the order backward reached them."""
        self.store.flush()


def _framed(steps: list[Step], before: Callable[[], Any], after: Callable[[], Any]) -> list[Step]:
    """`steps` with `before` run at the start of the first and `after` at the end of the last."""
    first = steps[0].run
    steps[0] = Step(steps[0].kind, lambda: (before(), first()), steps[0].name)
    last = steps[-1].run
    steps[-1] = Step(steps[-1].kind, lambda: (last(), after()), steps[-1].name)
    return steps


def interleave(forward: list[Step], backward: list[Step]) -> Iterator[Step]:
    """The two chains' steps in issue order: a compute step of one beside a communication step of
    the other (compute issued first). Where both chains' next steps are of one kind the backward's
    runs alone, which puts it one step ahead: both chains start with compute (the forward's
    attention, the backward's head or merge), and then each forward piece meets the backward piece
    the table in the module docstring names."""
    f = b = 0
    while f < len(forward) or b < len(backward):
        if f < len(forward) and b < len(backward) and forward[f].kind != backward[b].kind:
            pair = (forward[f], backward[b])
            yield from (pair if pair[0].kind == COMPUTE else pair[::-1])
            f, b = f + 1, b + 1
        elif b < len(backward):
            yield backward[b]
            b += 1
        else:
            yield forward[f]
            f += 1


def run_chain(steps: list[Step], streams: Streams) -> None:
    """One chain alone (a forward or backward outside F&B), on the streams its steps name."""
    chain = streams.chain()
    for step in steps:
        streams.run(step, chain)
    streams.join([chain])


def run_pair(forward: list[Step], backward: list[Step], streams: Streams,
             on_step: Optional[Callable[[Step], None]] = None) -> None:
    """The F&B operation: `forward` and `backward` (of different micro-batches) interleaved."""
    chains = {id(s): c for steps, c in ((forward, streams.chain()), (backward, streams.chain())) for s in steps}
    for step in interleave(forward, backward):
        streams.run(step, chains[id(step)])
        if on_step is not None:
            on_step(step)
    streams.join(list({id(c): c for c in chains.values()}.values()))
