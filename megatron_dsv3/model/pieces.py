"""A stage's forward written as a sequence of pieces, each computation or communication.

A piece reads named values from a state (tensors and plain objects) and returns the ones it
writes. Run in order (`run_in_order`) the pieces are the model's forward. The DualPipe schedule
runs them one at a time instead, so that the pieces of one micro-batch's forward alternate with
the pieces of another's backward (`pipeline/overlap.py`, report section 3.2.1, Figure 4).

A DeepSeek-V3 MoE layer is five pieces (`spec.DecoderLayer.pieces`, `moe.layer.DeepSeekMoE.pieces`):
  attention (compute: attention, norm, router, sort by expert)
  dispatch  (communication: all-to-all of the tokens to their experts' ranks)
  experts   (compute: routed and shared experts)
  combine   (communication: all-to-all of the expert outputs back)
  merge     (compute: unsort, weight by the gates, add the shared experts and the residual)
Adjacent pieces of one kind are fused (`fuse`), so a stage alternates compute and communication.
"""
from __future__ import annotations

import contextlib
from collections import ChainMap
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping

COMPUTE, COMM = "compute", "comm"

State = Mapping[str, Any]


@dataclass
class Piece:
    name: str
    kind: str  # COMPUTE or COMM
    run: Callable[[State], dict[str, Any]]  # reads the state, returns what it writes


@dataclass
class StagePlan:
    """One micro-batch's forward on one stage: its pieces, and how the state they leave becomes
    the stage's output (what the stage's plain forward returns)."""

    pieces: list[Piece]
    output: Callable[[State], Any]
    context: Callable[[], ContextManager] = field(default=contextlib.nullcontext)  # around every piece (autocast)


def own_pieces(module: Any) -> list[Piece] | None:
    """`module.pieces()` when its pieces describe its forward, None when it has none or a
    subclass redefines `forward` below the class that wrote `pieces`."""
    mro = type(module).__mro__
    defines = [next((i for i, cls in enumerate(mro) if name in vars(cls)), None) for name in ("forward", "pieces")]
    if defines[1] is None or defines[0] < defines[1]:
        return None
    return module.pieces()


def fuse(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces of the same kind as one piece (names joined with '+')."""
    fused: list[list[Piece]] = []
    for piece in pieces:
        if fused and fused[-1][0].kind == piece.kind:
            fused[-1].append(piece)
        else:
            fused.append([piece])
    return [parts[0] if len(parts) == 1 else _sequence(parts) for parts in fused]


def _sequence(parts: list[Piece]) -> Piece:
    def run(state: State) -> dict[str, Any]:
        written: dict[str, Any] = {}
        for part in parts:
            written.update(part.run(ChainMap(written, state)))
        return written

    return Piece("+".join(p.name for p in parts), parts[0].kind, run)


def run_in_order(pieces: list[Piece], state: dict[str, Any]) -> dict[str, Any]:
    """The pieces as one plain forward: each reads what the previous ones wrote."""
    for piece in pieces:
        state.update(piece.run(state))
    return state
