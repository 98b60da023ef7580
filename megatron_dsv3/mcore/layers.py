"""Adapters: Megatron-Core's call conventions around this project's layers.

They translate [seq, batch, hidden] tensors, `(output, bias)` returns and Megatron's constructor
keywords to this project's MLA (`model/mla.py`), DeepSeekMoE (`model/moe/layer.py`) and SwiGLU;
the mathematics lives there, not here. Parameter names inside a layer are the same as in
`DSV3Model`. Packed sequences and Megatron inference contexts raise at forward. `attention_mask`
and `position_ids` are ignored: attention is causal over positions 0..s-1.

MTP: Megatron's MTP layer and `DSV3Model` both feed depth 1 the final-normed main hidden state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank

from megatron_dsv3.compat.megatron_api import grow_aux_loss_entry, mtp_layer_attribute
from megatron_dsv3.config import ConfigError
from megatron_dsv3.mcore.config import check_supported, dsv3_config_from_megatron, moe_pattern
from megatron_dsv3.model.common import RMSNorm, SwiGLU
from megatron_dsv3.model.mla import MultiLatentAttention
from megatron_dsv3.model.moe.layer import DeepSeekMoE
from megatron_dsv3.model.moe.router import Router, Routing
from megatron_dsv3.model.rope import rope_frequencies
from megatron_dsv3.optim.zero1 import mark_for_megatron


@torch.no_grad()
def _init_like_megatron(module: torch.nn.Module, config: TransformerConfig) -> None:
    """Megatron's init: config.init_method (N(0, init_method_std)) for matrices, ones for norms; and
    the attributes Megatron's DDP, optimizer and gradient norm read (`mark_for_megatron`): routed
    experts in the expert-parallel buffers (reduced over the expert-data-parallel group, not the
    data-parallel one, where ranks hold other experts), tensor-parallel shards counted on every rank."""
    mark_for_megatron(module)
    if not config.perform_initialization:
        return
    for param in module.parameters():
        if param.dim() >= 2:
            config.init_method(param)
        else:
            param.fill_(1.0)


class _ShardedByAttributes:
    """`sharded_state_dict` for dist-checkpointing, read from the `tensor_parallel_dim`
    attributes that `common.py` puts on parameters (TP-sharded dims; others replicated)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        if any(getattr(p, "expert_parallel", False) for p in self.parameters()) and \
                parallel_state.get_expert_model_parallel_world_size() > 1:
            raise NotImplementedError("dist-checkpointing of expert-parallel DeepSeekMoE through Megatron's "
                                      "sharded_state_dict is not implemented; use megatron_dsv3.checkpoint")
        axes = {name: p.tensor_parallel_dim for name, p in self.named_parameters()
                if getattr(p, "tensor_parallel_dim", None) is not None}
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, axes,
                                                   sharded_offsets)


class MegatronRMSNorm(RMSNorm):
    """RMSNorm with Megatron's norm constructor (config, hidden_size, eps)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)


class MegatronMLA(_ShardedByAttributes, MultiLatentAttention):
    """Multi-head Latent Attention (`mla.py`) as Megatron's `self_attention` submodule.

    Megatron's GPTModel builds no rotary embedding for MLA configs, so this module computes its
    own interleaved (YaRN when configured) rope from positions 0..s-1; `rotary_pos_emb` and
    friends are ignored.
    """

    def __init__(self, config: TransformerConfig, layer_number: int = 1, pg_collection: Any = None,
                 attn_mask_type: Any = None, cp_comm_type: Any = None, **unused: Any):
        check_supported(config)
        dsv3 = dsv3_config_from_megatron(config)
        super().__init__(dsv3, layer_number - 1)  # Megatron numbers layers from 1, DSV3Model from 0
        # Kept out of the buffers so a bf16 cast of the model leaves the frequencies in FP32.
        self._inv_freq = rope_frequencies(dsv3.qk_rope_head_dim, dsv3.rope_theta, dsv3.yarn)
        _init_like_megatron(self, config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                key_value_states: Any = None, inference_context: Any = None, rotary_pos_emb: Any = None,
                rotary_pos_cos: Any = None, rotary_pos_sin: Any = None, rotary_pos_cos_sin: Any = None,
                attention_bias: Any = None, packed_seq_params: Any = None, sequence_len_offset: Any = None,
                *, inference_params: Any = None, **unused: Any):
        """hidden_states [s, b, h] -> (output [s, b, h], None)."""
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences (packed_seq_params) are not supported by MegatronMLA")
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("Megatron inference contexts are not supported; use DSV3Model with "
                                      "an InferenceCache for generation")
        positions = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        angles = positions.float()[:, None] * self._inv_freq.to(hidden_states.device)[None, :]
        out = super().forward(hidden_states.transpose(0, 1), angles.cos(), angles.sin())
        return out.transpose(0, 1).contiguous(), None


# The name Megatron's own router logs the sequence-wise balance loss under.
BALANCE_LOSS_NAME = "seq_load_balancing_loss"


class _MegatronRouter(Router):
    """Our router, plus what Megatron-Core's training loop expects of a router:

    * `local_tokens_per_expert`, read by finalize_model_grads (`_update_router_expert_bias`,
      `reset_model_temporary_tensors`): with moe_router_enable_expert_bias=True Megatron applies
      the aux-loss-free bias step (b_i += rate * sign(mean load - load_i)) to `expert_bias` itself.
    * the sequence-wise balance loss is handed to the MoE adapter (`pending_balance_loss`) instead
      of being attached by DeepSeekMoE, so the adapter can attach it the Megatron way.
    * tokens are counted, and the balance loss made, only in a forward that records gradients, as
      Megatron's own router does (`torch.is_grad_enabled()`): under activation recompute
      (`--recompute-granularity full`, or `mlp` among the selective modules) the first forward runs
      without gradients and the recomputed one with them, so each micro-batch counts once.
    """

    pending_balance_loss: Optional[torch.Tensor] = None

    @property
    def local_tokens_per_expert(self) -> torch.Tensor:
        return self.tokens_per_expert

    def forward(self, x_SBH: torch.Tensor) -> Routing:
        self.count_load = torch.is_grad_enabled()
        routing = super().forward(x_SBH)
        balance_loss = routing.balance_loss if torch.is_grad_enabled() else None
        self.pending_balance_loss, routing.balance_loss = balance_loss, None
        return routing


class MegatronDeepSeekMoE(_ShardedByAttributes, DeepSeekMoE):
    """DeepSeekMoE (`moe/layer.py`) as Megatron's `mlp` submodule: [s, b, h] -> (output, None).

    The complementary sequence-wise balance loss (report eq. 17-20, coefficient
    moe_aux_loss_coeff with moe_router_load_balancing_type='seq_aux_loss') is attached with
    Megatron's `MoEAuxLossAutoScaler`, so its gradient gets the scale Megatron's schedules set for
    the main loss (loss_scale / micro-batches, or per-token with calculate_per_token_loss), and is
    logged in Megatron's aux-loss tracker as 'seq_load_balancing_loss' (divided by the coefficient,
    as Megatron logs it). `padding_mask` is accepted and ignored (no padding in pretraining batches).
    """

    def __init__(self, config: TransformerConfig, submodules: Any = None, layer_number: Optional[int] = None,
                 pg_collection: Any = None, **unused: Any):
        check_supported(config)
        dsv3 = dsv3_config_from_megatron(config)
        super().__init__(dsv3, 0 if layer_number is None else layer_number - 1)
        self.router = _MegatronRouter(dsv3)
        self.per_token_loss = bool(getattr(config, "calculate_per_token_loss", False))
        self.tracked_layers = config.num_layers + (config.mtp_num_layers or 0)
        _init_like_megatron(self, config)
        if config.mtp_num_layers:
            initialize_mtp_guard()

    def set_layer_number(self, layer_number: int) -> None:
        """Called by TransformerLayer with the global 1-based layer number."""
        self.layer_number = layer_number - 1

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, **unused: Any):
        # [s, b, h] -> [b, s, h]: the sequence-wise balance loss is computed per sequence.
        out = super().forward(hidden_states.transpose(0, 1))
        balance_loss, self.router.pending_balance_loss = self.router.pending_balance_loss, None
        if balance_loss is not None:
            self.last_balance_loss = balance_loss.detach()
            self._log_balance_loss(balance_loss.detach() / self.router.config.seq_aux_loss_coeff)
            if self.per_token_loss:  # Megatron divides every gradient by the token count later
                balance_loss = balance_loss * (out.shape[0] * out.shape[1])
            out = MoEAuxLossAutoScaler.apply(out, balance_loss)
        return out.transpose(0, 1).contiguous(), None

    def _log_balance_loss(self, value: torch.Tensor) -> None:
        # Megatron sizes each tracker entry on first use; a model with more layers (MTP) built
        # later in the same process would index past it, so grow the entry first.
        grow_aux_loss_entry(BALANCE_LOSS_NAME, self.tracked_layers)
        # Logged as the data-parallel mean, as Megatron's own router logs it (0.16-0.17 average only
        # over the group given here; every tensor-parallel rank computes the same value).
        dp_group = parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None
        save_to_aux_losses_tracker(BALANCE_LOSS_NAME, value, self.layer_number + 1, self.tracked_layers,
                                   avg_group=dp_group)


class MegatronSwiGLU(_ShardedByAttributes, SwiGLU):
    """The dense SwiGLU feed-forward of the first k layers as Megatron's `mlp` submodule."""

    def __init__(self, config: TransformerConfig, submodules: Any = None, tp_group: Any = None,
                 ffn_hidden_size: Optional[int] = None, **unused: Any):
        check_supported(config)
        super().__init__(config.hidden_size, ffn_hidden_size or config.ffn_hidden_size)
        _init_like_megatron(self, config)

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, **unused: Any):
        return super().forward(hidden_states), None


class DSV3TransformerLayer(TransformerLayer):
    """Megatron's TransformerLayer that takes the dense `mlp` for layers marked 0 in
    `moe_layer_freq`: lets ONE layer spec describe all of DeepSeek-V3 (for Megatron-LM's
    `--spec`, which fans a single layer spec out to every layer)."""

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection: Any = None, vp_stage: Optional[int] = None,
                 dense_mlp: Union[ModuleSpec, type, None] = None):
        pp_group = getattr(pg_collection, "pp", None) if pg_collection is not None else None
        pp_rank = get_pg_rank(pp_group) if pp_group is not None else parallel_state.get_pipeline_model_parallel_rank()
        global_number = layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)
        dense = global_number <= config.num_layers and moe_pattern(config)[global_number - 1] == 0
        if dense_mlp is not None and dense:
            submodules = dataclasses.replace(submodules, mlp=dense_mlp)
        super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout,
                         pg_collection=pg_collection, vp_stage=vp_stage)



# ------------------------------------------------------------------ MTP layers must be ours
def check_mtp_layer(layer: torch.nn.Module, index: int = 0) -> None:
    """Refuse a Megatron MultiTokenPredictionLayer not built from megatron_dsv3's specs, naming the
    modules that are Megatron's own (its attention, MoE and norms, where a builder fell back to
    Megatron's stock MTP spec)."""
    inner = getattr(layer, mtp_layer_attribute())
    found = {"self_attention": inner.self_attention, "mlp": inner.mlp, "enorm": layer.enorm,
             "hnorm": layer.hnorm, "final_layernorm": layer.final_layernorm}
    wanted = {"self_attention": (MegatronMLA,), "mlp": (MegatronDeepSeekMoE, MegatronSwiGLU)}
    foreign = [f"{name}={type(module).__module__}.{type(module).__name__}" for name, module in found.items()
               if not isinstance(module, wanted.get(name, (MegatronRMSNorm,)))]
    if foreign:
        raise ConfigError(f"MTP layer {index} was built from Megatron's own specs, not megatron_dsv3's "
                          f"({', '.join(foreign)}): pass mtp_block_spec=get_dsv3_mtp_block_spec(config) to GPTModel; "
                          "with Megatron-LM use examples/megatron_lm/pretrain_dsv3.py, or patch pretrain_gpt.py's "
                          "builder for your release (patches/README.md)")


class _MTPGuard:
    """A torch global forward pre-hook: at the forward of a GPTModel whose decoder holds our layers,
    check its MTP layers; removed after the first such model passed. Models without our layers
    (Megatron's own, built in the same process) are left alone."""

    def __init__(self) -> None:
        # imported here: the module warns at import that Apex is missing, which `import megatron_dsv3` should not print
        from megatron.core.models.gpt import GPTModel

        self.model_class = GPTModel
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self)
        self.active = True

    def __call__(self, module: torch.nn.Module, inputs: Any) -> None:
        mtp = getattr(module, "mtp", None)
        if not isinstance(module, self.model_class) or mtp is None:
            return
        if not any(isinstance(m, (MegatronMLA, MegatronDeepSeekMoE)) for m in module.decoder.modules()):
            return
        for index, layer in enumerate(mtp.layers):
            check_mtp_layer(layer, index)
        self.handle.remove()
        self.active = False


_mtp_guard: Optional[_MTPGuard] = None


def initialize_mtp_guard() -> None:
    """Check the MTP layers of the first model built from our specs that runs in this process
    (`check_mtp_layer`), then stop checking.

    Registered by the MoE adapter of a model with MTP layers: a builder that makes the decoder from
    our specs and the MTP block from Megatron's own (Megatron-LM 0.19's pretrain_gpt.py `--spec`
    without the patch, with Transformer Engine) would otherwise train Megatron's MTP layer
    silently; nothing of ours runs after that block is built, so the model's first forward is
    where it is refused."""
    global _mtp_guard
    if _mtp_guard is None or not _mtp_guard.active:
        _mtp_guard = _MTPGuard()
