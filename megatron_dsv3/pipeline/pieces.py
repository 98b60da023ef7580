"""A stage's forward cut into pieces, for DualPipe's overlapped F&B step (report section 3.2.1,
Figure 4; run by `overlap.py`).

The model's forwards are plain code. This adapter calls the same steps they call, one piece at a
time (as Megatron-Core builds its overlapped 1F1B's callables beside a plain layer forward): a
piece calls one step on values it reads from a state and writes what the step returns, so the
pieces run in order compute what the forward computes. A DeepSeek-V3 MoE layer becomes

  attention, mlp norm   compute   `DecoderLayer.attention` (with its residual), the second RMSNorm
  route                 compute   `DeepSeekMoE.route`: router, sort by expert
  dispatch              comm      `DeepSeekMoE.dispatch`: all-to-all of the tokens to their experts
  shared experts,       compute   `DeepSeekMoE.shared`, `DeepSeekMoE.routed`
    experts
  combine               comm      `DeepSeekMoE.combine`: all-to-all of the expert outputs back
  merge, residual       compute   `DeepSeekMoE.merge` (unsort, gates, shared experts), the residual sum

after the stage's input (`DSV3Model.stage_input`). The last stage adds the head and its loss, per
MTP depth the merge of eq. 21, its block's pieces and its loss (eq. 23-24), then the total loss.
Under full recomputation a stage's layer is one piece. Without expert parallelism dispatch and
combine are compute. Adjacent pieces of one kind are fused (`fuse`), so a stage alternates compute
and communication: the units `overlap.interleave` pairs.
"""
from __future__ import annotations

import contextlib
import functools
import operator
from collections import ChainMap
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Optional

import torch
from torch import nn

from megatron_dsv3.model.gpt import DSV3Model, LMOutput
from megatron_dsv3.model.moe.layer import DeepSeekMoE
from megatron_dsv3.model.mtp import depth_input, depth_loss
from megatron_dsv3.model.spec import DecoderLayer

COMPUTE, COMM = "compute", "comm"

State = Mapping[str, Any]


@dataclass
class Piece:
    name: str
    kind: str  # COMPUTE or COMM: the stream it runs on
    run: Callable[[State], dict[str, Any]]  # reads the state, returns what it writes


@dataclass
class StagePieces:
    """One micro-batch's forward on one stage: its pieces, and how the state they leave becomes
    the stage's output (what the stage's plain forward returns)."""

    pieces: list[Piece]
    output: Callable[[State], Any]
    context: Callable[[], ContextManager] = field(default=contextlib.nullcontext)  # around every piece (autocast)


def calling(name: str, kind: str, fn: Callable, reads: tuple[str, ...], writes: tuple[str, ...]) -> Piece:
    """The piece that calls `fn` with the values under `reads` and writes its result under `writes`
    (one name: the result; several: its items; none: nothing)."""
    return Piece(name, kind, functools.partial(_call, fn, reads, writes))


def _call(fn: Callable, reads: tuple[str, ...], writes: tuple[str, ...], state: State) -> dict[str, Any]:
    result = fn(*(state[key] for key in reads))
    if len(writes) == 1:
        return {writes[0]: result}
    return dict(zip(writes, result)) if writes else {}


def cuttable(module: nn.Module) -> bool:
    """Whether `stage_pieces` can cut `module`'s forward."""
    return isinstance(module, DSV3Model)


def stage_pieces(model: DSV3Model, tokens: torch.Tensor, labels: torch.Tensor, mtp_loss_weight: Optional[float] = None,
                 balance_loss_scale: float = 1.0, stage: Optional[int] = None) -> StagePieces:
    """`model(tokens, labels=labels, ...)` (training, no inference cache) as pieces."""
    stage = model.held_stage(stage)
    cos, sin = model.rope(tokens)
    stage_input = functools.partial(model.stage_input, tokens, stage, balance_loss_scale)
    pieces = [calling("stage input", COMPUTE, stage_input, (), ("hidden",))]
    for layer in model.layers_of(stage):
        pieces += stage_layer_pieces(model, layer, cos, sin)
    if stage != model.num_stages - 1:
        pieces.append(calling("stage end", COMPUTE, model.collect_balance_loss, (), ()))
        return StagePieces(pieces, operator.itemgetter("hidden"))
    # The head writes the final-normed hidden state, MTP depth 1's input, as "hidden".
    head = functools.partial(model.head_loss, labels=labels)
    pieces.append(calling("head", COMPUTE, head, ("hidden",), ("lm_loss", "hidden")))
    depth = len(model.mtp) if model.mtp_weight(mtp_loss_weight) > 0 else 0
    for k, module in enumerate(model.mtp[:depth], start=1):  # mtp.mtp_loss's loop
        merge = functools.partial(depth_input, module, labels=labels, embed=model.embed_tokens, k=k)
        loss = functools.partial(depth_loss, module, model.lm_head, labels=labels, k=k)
        pieces += [calling(f"mtp {k} merge", COMPUTE, merge, ("hidden",), ("hidden",)),
                   *layer_pieces(module.layer, cos, sin),
                   calling(f"mtp {k} loss", COMPUTE, loss, ("hidden",), (f"mtp_loss_{k}",))]
    mtp_keys = tuple(f"mtp_loss_{k}" for k in range(1, depth + 1))
    total = functools.partial(_total_loss, model, mtp_loss_weight)
    pieces.append(calling("loss", COMPUTE, total, ("lm_loss", *mtp_keys), ("loss",)))
    return StagePieces(pieces, functools.partial(_lm_output, model, mtp_keys))


def stage_layer_pieces(model: DSV3Model, layer: nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> list[Piece]:
    """One of the stage's decoder layers: a single piece under full recomputation (which keeps only
    the layer's input), else `layer_pieces`."""
    if model.recomputes_layers():
        run = functools.partial(model.run_layer, layer, cos=cos, sin=sin)
        return [calling("recomputed layer", COMPUTE, run, ("hidden",), ("hidden",))]
    return layer_pieces(layer, cos, sin)


def layer_pieces(layer: nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> list[Piece]:
    """A decoder layer from "hidden" to "hidden": `DecoderLayer.forward`'s steps, or one piece for
    a layer of another kind."""
    if not _runs_own_forward(layer, DecoderLayer):
        run = functools.partial(_call_layer, layer, cos, sin)
        return [calling("layer", COMPUTE, run, ("hidden",), ("hidden",))]
    attention = functools.partial(layer.attention, cos=cos, sin=sin)
    return [calling("attention", COMPUTE, attention, ("hidden",), ("residual",)),
            calling("mlp norm", COMPUTE, layer.post_attention_layernorm, ("residual",), ("mlp_input",)),
            *mlp_pieces(layer.mlp),
            calling("residual", COMPUTE, operator.add, ("residual", "mlp_output"), ("hidden",))]


def mlp_pieces(mlp: nn.Module) -> list[Piece]:
    """The feed-forward from "mlp_input" to "mlp_output": `DeepSeekMoE.forward`'s steps, or one
    piece for a feed-forward of another kind (the dense SwiGLU)."""
    if not _runs_own_forward(mlp, DeepSeekMoE):
        return [calling("mlp", COMPUTE, mlp, ("mlp_input",), ("mlp_output",))]
    exchange = COMM if mlp.dispatcher.ep_size > 1 else COMPUTE
    routing = ("moe_permutation", "moe_gates", "moe_balance_loss")
    return [calling("route", COMPUTE, mlp.route, ("mlp_input",), ("moe_sorted", *routing)),
            calling("dispatch", exchange, mlp.dispatch, ("moe_sorted", "moe_permutation"),
                    ("moe_received", "moe_exchange")),
            calling("shared experts", COMPUTE, mlp.shared, ("mlp_input",), ("moe_shared",)),
            calling("experts", COMPUTE, mlp.routed, ("moe_received", "moe_exchange"), ("moe_expert_out",)),
            calling("combine", exchange, mlp.combine, ("moe_expert_out", "moe_exchange"), ("moe_combined",)),
            calling("merge", COMPUTE, mlp.merge, ("mlp_input", "moe_combined", "moe_shared", *routing),
                    ("mlp_output",))]


def _runs_own_forward(module: nn.Module, cls: type) -> bool:
    """Whether `module` is a `cls` whose forward is `cls.forward`, so that its steps are its forward."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _call_layer(layer: nn.Module, cos: torch.Tensor, sin: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return layer(hidden, cos, sin)


def _total_loss(model: DSV3Model, mtp_loss_weight: Optional[float], lm_loss: torch.Tensor,
                *mtp_losses: torch.Tensor) -> torch.Tensor:
    return model.total_loss(lm_loss, list(mtp_losses), mtp_loss_weight)


def _lm_output(model: DSV3Model, mtp_keys: tuple[str, ...], state: State) -> LMOutput:
    return LMOutput.of(state["loss"], state["lm_loss"], [state[key] for key in mtp_keys], model.last_balance_loss)


def fuse(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces of the same kind as one piece (names joined with '+')."""
    fused: list[list[Piece]] = []
    for piece in pieces:
        if fused and fused[-1][0].kind == piece.kind:
            fused[-1].append(piece)
        else:
            fused.append([piece])
    return [parts[0] if len(parts) == 1 else Piece("+".join(p.name for p in parts), parts[0].kind,
                                                   functools.partial(_run_in_order, parts))
            for parts in fused]


def _run_in_order(parts: list[Piece], state: State) -> dict[str, Any]:
    """Fused pieces as one: each part reads what the parts before it wrote (uncut)."""
    written: dict[str, Any] = {}
    for part in parts:
        written.update(part.run(ChainMap(written, state)))
    return written
