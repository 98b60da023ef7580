"""The DeepSeek-V3 language model: embedding -> decoder layers -> norm -> head (+ MTP).

Layers are built from ModuleSpecs (`spec.py`), so each can be swapped without touching this file.
Called with tokens [batch, seq] it returns logits [batch, seq, vocab]; with labels it returns
an `LMOutput` whose `loss` is LM loss + lambda/D * sum of MTP losses + balance losses (eq. 25).
`DSV3Model.forward` reads as its steps: the stage's input (the embedding on the first stage), its
decoder layers, then on the last stage the head and its loss, MTP (`mtp.py`) and the total loss.
DualPipe's overlapped step calls the same steps one at a time (`pipeline/pieces.py`).
"""
from __future__ import annotations

import contextlib
import functools
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_dsv3.config import RECOMPUTE_MODES, DSV3Config
from megatron_dsv3.fp8 import apply_fp8
from megatron_dsv3.model.common import Linear, RMSNorm
from megatron_dsv3.model.mla import InferenceCache
from megatron_dsv3.model.moe.layer import DeepSeekMoE
from megatron_dsv3.model.moe.router import Router
from megatron_dsv3.model.mtp import MTPModule, mtp_loss
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

    @classmethod
    def of(cls, loss: torch.Tensor, lm_loss: torch.Tensor, mtp_losses: list[torch.Tensor],
           balance_loss: Optional[torch.Tensor]) -> "LMOutput":
        """The training forward's output: `loss` with its graph, the parts detached for reporting."""
        return cls(loss, lm_loss.detach(), [m.detach() for m in mtp_losses], balance_loss)

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


def _replaying_contexts(layer: nn.Module) -> tuple[contextlib.AbstractContextManager, _ReplayingForward]:
    """checkpoint's `context_fn` for a recomputed layer: nothing around its forward, routing load
    not counted around its replay."""
    return contextlib.nullcontext(), _ReplayingForward(layer)


class DSV3Model(nn.Module):
    def __init__(self, config: DSV3Config, layer_spec: LayerSpecFn = decoder_layer_spec, seed: int = 0,
                 stages: Optional[tuple[int, ...]] = None, num_stages: Optional[int] = None):
        """`stages` of `num_stages` model stages are built on this rank (default: the pipeline
        rank's one stage of the pipeline size; DualPipe/DualPipeV pass two, see
        `pipeline.schedule.Schedule.rank_stages`). Parameters of all held stages live in this one module, keyed
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
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False) if self.last_stage else None
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
        the result does not depend on construction order. Meta parameters (a rehearsal's: shapes
        without data) are left as they are: drawing their values would materialise them."""
        tp_rank, ep_rank = groups.rank(groups.tp_group()), groups.rank(groups.ep_group())
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
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
        stage = self.held_stage(stage)
        cos, sin = self.rope(tokens, cache)
        hidden = self.stage_input(tokens, stage, balance_loss_scale)
        for layer in self.layers_of(stage):
            hidden = self.run_layer(layer, hidden, cos, sin, cache)
        if cache is not None:
            cache.offset += tokens.shape[1]
        if stage != self.num_stages - 1:
            return self.stage_output(hidden)
        if labels is None:
            return self.lm_head(self.norm(hidden))
        lm_loss, normed = self.head_loss(hidden, labels)
        mtp_losses = self.mtp_losses(normed, tokens, labels, cos, sin, mtp_loss_weight)  # eq. 21-24
        loss = self.total_loss(lm_loss, mtp_losses, mtp_loss_weight)  # eq. 25
        return LMOutput.of(loss, lm_loss, mtp_losses, self.last_balance_loss)

    def held_stage(self, stage: Optional[int]) -> int:
        """`stage`, or this rank's only stage when None."""
        if stage is None:
            if len(self.stages) != 1:
                raise ValueError(f"this rank holds stages {self.stages}: pass stage=")
            stage = self.stages[0]
        return stage

    def rope(self, tokens: torch.Tensor, cache: Optional[InferenceCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the positions of `tokens` (after the cache's, when generating)."""
        offset = cache.offset if cache is not None else 0
        return self.rotary(torch.arange(offset, offset + tokens.shape[1], device=tokens.device))

    def stage_input(self, tokens: torch.Tensor, stage: int, balance_loss_scale: float) -> torch.Tensor:
        """The embedded tokens on the first stage, the previous stage's hidden state elsewhere; and
        the factor the schedule applies to the loss, handed to this stage's balance losses."""
        for moe in self.moe_layers():
            moe.balance_loss_scale = balance_loss_scale
        return self.embed_tokens(tokens) if stage == 0 else self.input_hidden

    def layers_of(self, stage: int) -> list[nn.Module]:
        """The decoder layers of held stage `stage`, in order."""
        return [self.layers[str(i)] for i in self.stage_layer_ids[stage]]

    def recomputes_layers(self, cache: Optional[InferenceCache] = None) -> bool:
        """Whether full recomputation applies to this forward (training with gradients)."""
        return self.recompute == "full" and self.training and torch.is_grad_enabled() and cache is None

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cache: Optional[InferenceCache] = None) -> torch.Tensor:
        """One decoder layer; under full recomputation only its input is kept and it reruns in backward."""
        if self.recomputes_layers(cache):
            return checkpoint(layer, hidden, cos, sin, use_reentrant=False,
                              context_fn=functools.partial(_replaying_contexts, layer))
        return layer(hidden, cos, sin, cache)

    def stage_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """A stage before the last: its hidden state, once its balance losses are collected."""
        self.collect_balance_loss()
        return hidden

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The language-model cross-entropy, and the final-normed hidden state it read, which MTP
        depth 1 starts from (as Megatron-Core and vLLM do)."""
        normed = self.norm(hidden)
        logits = self.lm_head(normed)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100), normed

    def mtp_weight(self, mtp_loss_weight: Optional[float]) -> float:
        """This step's lambda (eq. 25): the argument, else the config's."""
        return self.config.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight

    def mtp_losses(self, normed: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, mtp_loss_weight: Optional[float] = None) -> list[torch.Tensor]:
        """L^1 .. L^D of MTP (eq. 21-24) from the final-normed hidden state; none when lambda is 0."""
        if self.mtp_weight(mtp_loss_weight) <= 0:
            return []
        return mtp_loss(self.mtp, normed, tokens, labels, self.embed_tokens, self.lm_head, cos, sin)

    def total_loss(self, lm_loss: torch.Tensor, mtp_losses: list[torch.Tensor],
                   mtp_loss_weight: Optional[float] = None) -> torch.Tensor:
        """L_Main + lambda / D * sum_k L^k (eq. 25) + the stage's balance losses (their value only:
        each MoE layer attached its gradient)."""
        loss = lm_loss
        if mtp_losses:
            loss = loss + self.mtp_weight(mtp_loss_weight) / len(mtp_losses) * sum(mtp_losses)
        self.collect_balance_loss()
        if self.last_balance_loss is not None:
            loss = loss + self.last_balance_loss
        return loss

    def collect_balance_loss(self) -> None:
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
        apply_fp8(model)
    return model
