"""The DeepSeek-V3 language model: embedding -> decoder layers -> norm -> head (+ MTP).

Layers are built from ModuleSpecs (`spec.py`), so each can be swapped without touching this file.
Called with tokens [batch, seq] it returns logits [batch, seq, vocab]; with labels it returns
an `LMOutput` whose `loss` is LM loss + lambda/D * sum of MTP losses + balance losses.
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_dsv3.config import RECOMPUTE_MODES, DSV3Config
from megatron_dsv3.model.common import RMSNorm
from megatron_dsv3.model.mla import InferenceCache
from megatron_dsv3.model.moe.layer import DeepSeekMoE
from megatron_dsv3.model.moe.router import Router
from megatron_dsv3.model.mtp import MTPModule, mtp_pieces
from megatron_dsv3.model.pieces import COMPUTE, Piece, StagePlan, run_in_order
from megatron_dsv3.model.rope import RotaryEmbedding
from megatron_dsv3.model.spec import decoder_layer_spec
from megatron_dsv3.parallel import groups
from megatron_dsv3.parallel.layout import stage_layers

LayerSpecFn = Callable[[DSV3Config, int], ModuleSpec]


@dataclass
class LMOutput:
    loss: torch.Tensor  # what backward() is called on
    lm_loss: torch.Tensor
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    balance_loss: Optional[torch.Tensor] = None  # sum over MoE layers (its gradient is attached in-layer)

    @property
    def mtp_loss(self) -> Optional[torch.Tensor]:
        return torch.stack(self.mtp_losses).mean() if self.mtp_losses else None


class _ReplayingForward:
    """A recomputed layer runs its forward again in backward; its routing load must be counted
    once. Re-enterable: a backward split into input and weight gradients recomputes twice."""

    def __init__(self, layer: nn.Module):
        self.routers = [m for m in layer.modules() if isinstance(m, Router)]

    def __enter__(self) -> None:
        for router in self.routers:
            router.count_load = False

    def __exit__(self, *exc) -> None:
        for router in self.routers:
            router.count_load = True


class DSV3Model(nn.Module):
    def __init__(self, config: DSV3Config, layer_spec: LayerSpecFn = decoder_layer_spec, seed: int = 0,
                 stages: Optional[tuple[int, ...]] = None, num_stages: Optional[int] = None):
        """`stages` of `num_stages` model stages are built on this rank (default: the pipeline
        rank's one stage of the pipeline size; DualPipe/DualPipeV pass two, see
        `parallel.layout.rank_stages`). Parameters of all held stages live in this one module, keyed
        by global layer index; `forward(stage=...)` runs one of them."""
        super().__init__()
        self.config = config
        if stages is None:
            stages, num_stages = (groups.rank(groups.pp_group()),), groups.size(groups.pp_group())
        self.stages, self.num_stages = tuple(stages), num_stages
        self.first_stage, self.last_stage = 0 in self.stages, num_stages - 1 in self.stages  # held by this rank
        self.input_hidden: Optional[torch.Tensor] = None  # [b, s, h] from the previous stage
        self.last_balance_loss: Optional[torch.Tensor] = None  # this stage's, detached, for logging
        has_mtp = self.last_stage and config.mtp_num_modules > 0
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if self.first_stage or has_mtp else None
        if self.embed_tokens is not None and not (self.first_stage and self.last_stage) and config.mtp_num_modules > 0:
            # stage 0's embedding (0) and MTP's copy on the last stage's rank (1): their gradients are summed
            self.embed_tokens.weight.pipeline_copy = 0 if self.first_stage else 1
        # Keyed by global layer index, so parameter names do not depend on the pipeline layout.
        self.stage_layer_ids = {s: stage_layers(config.num_layers, num_stages, s) for s in self.stages}
        self.layers = nn.ModuleDict({str(i): build_module(layer_spec(config, i))
                                     for s in sorted(self.stages) for i in self.stage_layer_ids[s]})
        self.norm = RMSNorm(config.hidden_size, config.norm_eps) if self.last_stage else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if self.last_stage else None
        self.mtp = nn.ModuleList(MTPModule(config, layer_spec(config, config.num_layers + k))
                                 for k in range(config.mtp_num_modules if self.last_stage else 0))
        self.rotary = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta, config.yarn)
        self.recompute = "none"
        self.init_weights(seed)

    @property
    def recompute(self) -> str:
        """Activation recomputation in backward: "none"; "selective" (RMSNorm, MLA up-projections
        and SwiGLU outputs, report section 3.2.3); "full" (every decoder layer, keeping its input)."""
        return self._recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute={mode!r} is not one of {RECOMPUTE_MODES}")
        self._recompute = mode
        for module in self.modules():
            if hasattr(module, "selective_recompute"):
                module.selective_recompute = mode == "selective"

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """N(0, init_std) for every matrix, ones for norms. Each parameter draws from its own
        generator keyed by (seed, name, shard), so tensor- and expert-parallel shards differ and
        the result does not depend on construction order."""
        tp_rank, ep_rank = groups.rank(groups.tp_group()), groups.rank(groups.ep_group())
        for name, param in self.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
                continue
            shard = ep_rank if getattr(param, "expert_parallel", False) else (
                tp_rank if getattr(param, "tensor_parallel_dim", None) is not None else 0)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()) * 131 + shard)
            param.copy_(torch.randn(param.shape, generator=generator) * self.config.init_std)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cache: Optional[InferenceCache] = None, mtp_loss_weight: Optional[float] = None,
                balance_loss_scale: float = 1.0, stage: Optional[int] = None):
        """tokens [b, s] -> logits [b, s, vocab] (no labels) or LMOutput (labels [b, s]).

        A stage before the last returns its hidden state [b, s, h] for the next stage. Training
        passes this step's MTP weight lambda (default: the config's) and the factor the schedule
        applies to the loss (1 / micro-batches), which the balance losses' gradients take.
        `stage`: which held stage to run (needed when the rank holds two)."""
        plan = self.stage_plan(tokens, labels, cache, mtp_loss_weight, balance_loss_scale, stage)
        return plan.output(run_in_order(plan.pieces, {}))

    def stage_plan(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   cache: Optional[InferenceCache] = None, mtp_loss_weight: Optional[float] = None,
                   balance_loss_scale: float = 1.0, stage: Optional[int] = None) -> StagePlan:
        """`forward` as pieces (`model/pieces.py`), which the DualPipe schedule runs interleaved
        with another micro-batch's backward: embedding (first stage), each decoder layer's pieces
        (one piece per layer under full recomputation), the head and loss, MTP (last stage)."""
        if stage is None:
            if len(self.stages) != 1:
                raise ValueError(f"this rank holds stages {self.stages}: pass stage=")
            stage = self.stages[0]
        first, last = stage == 0, stage == self.num_stages - 1
        mtp_loss_weight = self.config.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight
        offset = cache.offset if cache is not None else 0
        cos, sin = self.rotary(torch.arange(offset, offset + tokens.shape[1], device=tokens.device))
        recompute = self.recompute == "full" and self.training and torch.is_grad_enabled() and cache is None

        def start(state):
            for moe in self.moe_layers():
                moe.balance_loss_scale = balance_loss_scale
            return {"hidden": self.embed_tokens(tokens) if first else self.input_hidden}

        pieces = [Piece("stage input", COMPUTE, start)]
        for layer in (self.layers[str(i)] for i in self.stage_layer_ids[stage]):
            if recompute:  # keep only each layer's input; rerun the layer in backward
                pieces.append(Piece("recomputed layer", COMPUTE, lambda state, layer=layer: {"hidden": checkpoint(
                    layer, state["hidden"], cos, sin, use_reentrant=False,
                    context_fn=lambda: (contextlib.nullcontext(), _ReplayingForward(layer)))}))
            elif hasattr(layer, "pieces"):
                pieces += layer.pieces(cos, sin, cache)
            else:
                pieces.append(Piece("layer", COMPUTE, lambda state, layer=layer: {"hidden": layer(state["hidden"], cos, sin, cache)}))
        if cache is not None:
            pieces.append(Piece("cache", COMPUTE, lambda state: setattr(cache, "offset", offset + tokens.shape[1]) or {}))
        if not last:
            pieces.append(Piece("stage end", COMPUTE, lambda state: self._collect_balance_loss() or {}))
            return StagePlan(pieces, lambda state: state["hidden"])

        def head(state):
            hidden = self.norm(state["hidden"])  # MTP depth 1 starts from this normalised state, as Megatron-Core and vLLM do
            logits = self.lm_head(hidden)
            if labels is None:
                return {"logits": logits}
            lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            return {"lm_loss": lm_loss, "mtp_hidden": hidden}

        pieces.append(Piece("head", COMPUTE, head))
        if labels is None:
            return StagePlan(pieces, lambda state: state["logits"])
        depth = len(self.mtp) if mtp_loss_weight > 0 else 0
        if depth:
            pieces += mtp_pieces(self.mtp, labels, self.embed_tokens, self.lm_head, cos, sin)
        mtp_keys = [f"mtp_loss_{k}" for k in range(1, depth + 1)]

        def total_loss(state):
            loss = state["lm_loss"]
            if depth:
                loss = loss + mtp_loss_weight / depth * sum(state[key] for key in mtp_keys)
            self._collect_balance_loss()
            if self.last_balance_loss is not None:
                loss = loss + self.last_balance_loss  # value only: the gradient was attached inside each MoE layer
            return {"loss": loss}

        pieces.append(Piece("loss", COMPUTE, total_loss))
        return StagePlan(pieces, lambda state: LMOutput(state["loss"], state["lm_loss"].detach(),
                                                        [state[key].detach() for key in mtp_keys],
                                                        self.last_balance_loss))

    def _collect_balance_loss(self) -> None:
        """Sum this stage's sequence-wise balance losses of the forward just run into `last_balance_loss`."""
        balance = [m.last_balance_loss for m in self.moe_layers() if m.last_balance_loss is not None]
        self.last_balance_loss = torch.stack(balance).sum() if balance and self.training else None
        for m in self.moe_layers():
            m.last_balance_loss = None

    def moe_layers(self) -> list[DeepSeekMoE]:
        return [m for m in self.modules() if isinstance(m, DeepSeekMoE)]

    def routers(self) -> list[Router]:
        return [m.router for m in self.moe_layers()]


def build_model(config: DSV3Config, layer_spec: LayerSpecFn = decoder_layer_spec, seed: int = 0,
                stages: Optional[tuple[int, ...]] = None, num_stages: Optional[int] = None) -> DSV3Model:
    """The DeepSeek-V3 model for `config`, sharded over the current tensor/expert groups, holding
    `stages` of `num_stages` pipeline stages (default: this pipeline rank's one). With
    `config.fp8 == "tile"` (the one switch for FP8) its linears and expert GEMMs are FP8."""
    layout = groups.layout()
    config.validate(tensor_parallel_size=layout.tensor, expert_parallel_size=layout.expert,
                    pipeline_parallel_size=num_stages or layout.pipeline)
    model = DSV3Model(config, layer_spec, seed, stages, num_stages)
    if config.fp8 == "tile":
        from megatron_dsv3.fp8 import apply_fp8

        apply_fp8(model)
    return model
