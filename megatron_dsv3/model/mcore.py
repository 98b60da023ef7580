"""DeepSeek-V3 inside Megatron-Core's own TransformerLayer / TransformerBlock / GPTModel.

An organisation on Megatron-Core keeps its model code and swaps ModuleSpecs:

    config = megatron_config_from_dsv3(DSV3Config.preset("deepseek-v3-671b"))  # or their own MLATransformerConfig
    model = GPTModel(config, transformer_layer_spec=get_dsv3_decoder_block_spec(config),
                     mtp_block_spec=get_dsv3_mtp_block_spec(config),
                     vocab_size=129280, max_sequence_length=4096, position_embedding_type="rope")

The adapters here translate Megatron's call conventions ([seq, batch, hidden] tensors, `(output,
bias)` returns, constructor keywords) to this project's MLA (`mla.py`) and DeepSeekMoE
(`moe/layer.py`); the mathematics lives there, not here. Parameter names inside a layer are the
same as in `DSV3Model`, so weights move between the two with a prefix rename
(`megatron_state_dict_to_dsv3` / `dsv3_state_dict_to_megatron`); tests/test_mcore_spec.py
checks that both models then give the same logits.

First-k-dense is expressed as Megatron does it: `config.moe_layer_freq` as a list
([0]*k + [1]*(L-k)); the block spec holds one layer spec per layer. For Megatron-LM's
`--spec MODULE NAME` (which passes the named object to GPTModel without calling it) the
module-level `dsv3_layer_spec` is a single layer spec whose layer class picks dense or MoE from
`moe_layer_freq` by its global layer number.

MTP: Megatron's MTP layer and `DSV3Model` both feed depth 1 the final-normed main hidden state.

Not supported through these adapters (`check_supported` raises, naming the field): sequence /
context parallelism, attention dropout, FP8/FP4, tensor-sharded experts, token dropping and
Megatron's other router extras. Packed sequences and Megatron inference contexts raise at
forward. `attention_mask` and `position_ids` are ignored: attention is causal over positions
0..s-1.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional, Union

import torch
from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank

from megatron_dsv3.config import ConfigError, DSV3Config, YarnConfig
from megatron_dsv3.model.common import RMSNorm, SwiGLU
from megatron_dsv3.model.mla import MultiLatentAttention
from megatron_dsv3.model.moe.layer import DeepSeekMoE
from megatron_dsv3.model.moe.router import Router, Routing
from megatron_dsv3.model.rope import rope_frequencies
from megatron_dsv3.compat.megatron_api import (build_megatron_config, config_value, grow_aux_loss_entry,
                                               mtp_layer_attribute)


# ------------------------------------------------------------------------ configs
DEEPSEEK_GROUP_SUM = 2  # an expert group's score: the sum of its top-2 expert scores (DeepSeek-V3's router)


class GroupScoreWarning(UserWarning):
    """Megatron's router would score expert groups differently from DeepSeek-V3's for this config."""


def group_score_difference(topk: int, group_topk: Optional[int], groups: Optional[int]) -> Optional[str]:
    """Why Megatron-Core's own group-limited router (group score = sum of the top topk // group_topk
    expert scores) routes differently from DeepSeek-V3's (sum of the top 2) for this config, or None."""
    if (groups or 1) <= 1 or topk // (group_topk or 1) == DEEPSEEK_GROUP_SUM:
        return None
    summed = topk // (group_topk or 1)
    return (f"moe_router_topk={topk} // moe_router_group_topk={group_topk} = {summed}: Megatron-Core's own router "
            f"scores each expert group by the sum of its top {summed} expert scores, DeepSeek-V3 (and this "
            f"project's router, which the adapters here use) by its top {DEEPSEEK_GROUP_SUM}, so a model routed by "
            "Megatron's router picks other groups for some tokens")


def _moe_pattern(config: TransformerConfig) -> list[int]:
    """1 = MoE layer, 0 = dense, per layer, read from `moe_layer_freq` as Megatron does."""
    if not config.num_moe_experts:
        return [0] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    pattern = [int(v) for v in freq]
    if len(pattern) != config.num_layers:
        raise ConfigError(f"moe_layer_freq has {len(pattern)} entries for num_layers={config.num_layers}")
    return pattern


def _first_k_dense(config: TransformerConfig) -> int:
    pattern = _moe_pattern(config)
    k = pattern.index(1) if 1 in pattern else len(pattern)
    if any(v != 1 for v in pattern[k:]):
        raise ConfigError(f"moe_layer_freq={config.moe_layer_freq} is not first-k-dense ([0]*k + [1]*(L-k)), "
                          "the only layout of DeepSeek-V3")
    return k


def _balancing_types(config: TransformerConfig) -> list[str]:
    kind = config.moe_router_load_balancing_type
    return [kind] if isinstance(kind, str) else list(kind)


def _seq_aux_coeff(config: TransformerConfig) -> float:
    types = _balancing_types(config)
    if "seq_aux_loss" not in types:
        return 0.0
    coeff = config.moe_aux_loss_coeff
    return float(coeff[types.index("seq_aux_loss")] if isinstance(coeff, (list, tuple)) else coeff)


def dsv3_config_from_megatron(config: TransformerConfig, **overrides: Any) -> DSV3Config:
    """The DSV3Config that a Megatron-Core (MLA)TransformerConfig describes.

    `vocab_size` and `max_position_embeddings` are GPTModel arguments, not config fields: pass
    them as overrides when they matter (the adapters do not need them). Raises ConfigError for
    settings this project does not implement (softmax routing, non-first-k-dense layouts, ...).
    """
    if not getattr(config, "multi_latent_attention", False):
        raise ConfigError("DeepSeek-V3 needs multi_latent_attention=True (use MLATransformerConfig)")
    if not config.num_moe_experts:
        raise ConfigError("num_moe_experts is required (DeepSeek-V3 layers after the first k are MoE)")
    if config.moe_router_score_function != "sigmoid":
        raise ConfigError(f"moe_router_score_function={config.moe_router_score_function!r}: DeepSeek-V3 "
                          "routing is sigmoid (report eq. 15)")
    # moe_router_pre_softmax (in Megatron's own DeepSeek-V3 example) chooses whether the softmax runs
    # before or after the top-k; Megatron reads it only for moe_router_score_function='softmax', and
    # sigmoid scores are per expert, so top-k then normalise is the same either way: accepted, no effect.
    difference = group_score_difference(config.moe_router_topk, config.moe_router_group_topk,
                                        config.moe_router_num_groups)
    if difference:
        warnings.warn(difference, GroupScoreWarning, stacklevel=2)
    unsupported = [t for t in _balancing_types(config) if t not in ("seq_aux_loss", "none")]
    if unsupported:
        raise ConfigError(f"moe_router_load_balancing_type {unsupported} is not implemented; use 'seq_aux_loss' "
                          "(complementary sequence-wise loss) or 'none' (bias only)")
    if not getattr(config, "qk_layernorm", False):
        raise ConfigError("qk_layernorm=False: DeepSeek-V3 normalises the query and KV latents "
                          "(q_a_layernorm, kv_a_layernorm); set qk_layernorm=True (--qk-layernorm)")
    if not config.gated_linear_unit or config.add_bias_linear:
        raise ConfigError("DeepSeek-V3 feed-forwards are SwiGLU without biases: set gated_linear_unit=True, "
                          "add_bias_linear=False")
    shared = config.moe_shared_expert_intermediate_size or 0
    moe_ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
    if shared % moe_ffn:
        raise ConfigError(f"moe_shared_expert_intermediate_size={shared} is not a multiple of "
                          f"moe_ffn_hidden_size={moe_ffn}")
    yarn = None
    if config_value(config, "rope_type", "rope") == "yarn" and config_value(config, "rotary_scaling_factor", 1.0) > 1:
        yarn = YarnConfig(
            factor=float(config_value(config, "rotary_scaling_factor")),
            original_max_position_embeddings=int(config_value(config, "original_max_position_embeddings")),
            beta_fast=float(config_value(config, "beta_fast")), beta_slow=float(config_value(config, "beta_slow")),
            mscale=float(config_value(config, "mscale")), mscale_all_dim=float(config_value(config, "mscale_all_dim")))
    fp8 = "none"
    if config.fp8:
        if getattr(config, "fp8_recipe", None) != "blockwise":
            raise ConfigError(f"fp8_recipe={getattr(config, 'fp8_recipe', None)!r}: DeepSeek-V3's FP8 is the "
                              "1x128 / 128x128 tile scaling, fp8_recipe='blockwise'")
        fp8 = "tile"
    values = dict(
        hidden_size=config.hidden_size, num_layers=config.num_layers, first_k_dense_layers=_first_k_dense(config),
        dense_ffn_hidden_size=config.ffn_hidden_size, norm_eps=config.layernorm_epsilon,
        init_std=config.init_method_std, num_attention_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank or 0, kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_head_dim, qk_rope_head_dim=config.qk_pos_emb_head_dim,
        v_head_dim=config.v_head_dim, rope_theta=float(config.rotary_base), yarn=yarn,
        num_routed_experts=config.num_moe_experts, num_shared_experts=shared // moe_ffn,
        num_experts_per_token=config.moe_router_topk, moe_ffn_hidden_size=moe_ffn,
        num_expert_groups=config.moe_router_num_groups or 1, num_limited_groups=config.moe_router_group_topk or 1,
        routed_scaling_factor=float(config.moe_router_topk_scaling_factor or 1.0),
        bias_update_rate=float(config.moe_router_bias_update_rate) if config.moe_router_enable_expert_bias else 0.0,
        seq_aux_loss_coeff=_seq_aux_coeff(config), mtp_num_modules=config.mtp_num_layers or 0,
        mtp_loss_weight=float(config.mtp_loss_scaling_factor or 0.0), fp8=fp8)
    values.update(overrides)
    return DSV3Config(**values).validate(tensor_parallel_size=config.tensor_model_parallel_size,
                                         expert_parallel_size=config.expert_model_parallel_size)


FP8_UNSUPPORTED = ("not supported (untested): train FP8 with dsv3-train / DSV3Model (train.fp8: tile), "
                   "which runs the 1x128 / 128x128 tile scaling itself")


def megatron_config_from_dsv3(cfg: DSV3Config, **overrides: Any) -> MLATransformerConfig:
    """The MLATransformerConfig of a DSV3Config; `overrides` add or replace Megatron fields
    (parallel sizes, dtypes, use_cpu_initialization, dropout, ...). Fields unknown to the
    installed Megatron-Core are dropped with a warning (`megatron_dsv3.compat.megatron_api`)."""
    values: dict[str, Any] = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.dense_ffn_hidden_size, normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0,  # DeepSeek-V3 trains without dropout
        init_method_std=cfg.init_std, multi_latent_attention=True, qk_layernorm=True,
        q_lora_rank=cfg.q_lora_rank or None,
        kv_lora_rank=cfg.kv_lora_rank, qk_head_dim=cfg.qk_nope_head_dim, qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, rotary_base=cfg.rope_theta, rope_type="yarn" if cfg.yarn else "rope",
        num_moe_experts=cfg.num_routed_experts, moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.num_shared_experts * cfg.moe_ffn_hidden_size or None,
        moe_layer_freq=[0] * cfg.first_k_dense_layers + [1] * cfg.num_moe_layers,
        moe_router_topk=cfg.num_experts_per_token, moe_router_score_function="sigmoid",
        moe_router_num_groups=cfg.num_expert_groups if cfg.num_expert_groups > 1 else None,
        moe_router_group_topk=cfg.num_limited_groups if cfg.num_expert_groups > 1 else None,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor, moe_router_dtype="fp32",
        moe_router_enable_expert_bias=cfg.bias_update_rate > 0,
        moe_router_bias_update_rate=cfg.bias_update_rate if cfg.bias_update_rate > 0 else 1e-3,
        moe_router_load_balancing_type="seq_aux_loss" if cfg.seq_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=cfg.seq_aux_loss_coeff, mtp_num_layers=cfg.mtp_num_modules or None,
        mtp_loss_scaling_factor=cfg.mtp_loss_weight)
    if cfg.yarn is not None:
        values.update(rotary_scaling_factor=cfg.yarn.factor,
                      original_max_position_embeddings=cfg.yarn.original_max_position_embeddings,
                      beta_fast=cfg.yarn.beta_fast, beta_slow=cfg.yarn.beta_slow, mscale=cfg.yarn.mscale,
                      mscale_all_dim=cfg.yarn.mscale_all_dim)
    difference = group_score_difference(cfg.num_experts_per_token, cfg.num_limited_groups, cfg.num_expert_groups)
    if difference:
        warnings.warn(difference, GroupScoreWarning, stacklevel=2)
    if cfg.fp8 == "tile":  # the adapters refuse FP8 configs (check_supported): emit none they would refuse
        raise ConfigError(f"fp8='tile' through these adapters is {FP8_UNSUPPORTED}")
    values.update(overrides)
    return build_megatron_config(MLATransformerConfig, **values)


# ----------------------------------------------------------------------- adapters
def check_supported(config: TransformerConfig) -> None:
    """Refuse Megatron-Core settings the adapters do not implement, naming the field.

    Called by the spec builders and by every adapter constructor (so Megatron-LM's `--spec`
    path, which calls no builder, is covered too). Architecture mismatches (softmax routing,
    non-first-k-dense layouts, ...) are refused by `dsv3_config_from_megatron`.
    """
    refused = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            refused.append(message)

    need(not config.sequence_parallel, "sequence_parallel=True (--sequence-parallel)")
    need(config.context_parallel_size == 1,
         f"context_parallel_size={config.context_parallel_size} (--context-parallel-size)")
    need(not config.attention_dropout, f"attention_dropout={config.attention_dropout} (MLA applies no "
         "attention dropout; set --attention-dropout 0)")
    need(not (config.fp8 or getattr(config, "fp4", None)),
         f"fp8={config.fp8!r} / fp4: FP8 through these adapters is {FP8_UNSUPPORTED}")
    need(config.tensor_model_parallel_size == 1 or config.expert_tensor_parallel_size == 1,
         f"expert_tensor_parallel_size={config.expert_tensor_parallel_size} (routed experts are not "
         "tensor-sharded; set --expert-tensor-parallel-size 1)")
    need(config.moe_expert_capacity_factor is None,
         f"moe_expert_capacity_factor={config.moe_expert_capacity_factor} (DeepSeekMoE drops no tokens)")
    for name in ("moe_shared_expert_gate", "moe_shared_expert_overlap", "moe_router_force_load_balancing"):
        need(not getattr(config, name, False), f"{name}=True")
    for name in ("moe_z_loss_coeff", "moe_input_jitter_eps", "moe_router_topk_limited_devices"):
        need(getattr(config, name, None) in (None, 0, 0.0), f"{name}={getattr(config, name)}")
    if refused:
        raise ConfigError("not supported by the DeepSeek-V3 Megatron-Core adapters: " + "; ".join(refused))


@torch.no_grad()
def _init_like_megatron(module: torch.nn.Module, config: TransformerConfig) -> None:
    """Megatron's init: config.init_method (N(0, init_method_std)) for matrices, ones for norms."""
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
    """

    pending_balance_loss: Optional[torch.Tensor] = None

    @property
    def local_tokens_per_expert(self) -> torch.Tensor:
        return self.tokens_per_expert

    def forward(self, x_SBH: torch.Tensor) -> Routing:
        routing = super().forward(x_SBH)
        self.pending_balance_loss, routing.balance_loss = routing.balance_loss, None
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
        save_to_aux_losses_tracker(BALANCE_LOSS_NAME, value, self.layer_number + 1, self.tracked_layers)


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
        dense = global_number <= config.num_layers and _moe_pattern(config)[global_number - 1] == 0
        if dense_mlp is not None and dense:
            submodules = dataclasses.replace(submodules, mlp=dense_mlp)
        super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout,
                         pg_collection=pg_collection, vp_stage=vp_stage)


# -------------------------------------------------------------------------- specs
def _layer_submodules(mlp: ModuleSpec) -> TransformerLayerSubmodules:
    return TransformerLayerSubmodules(
        input_layernorm=MegatronRMSNorm,
        # attn_mask_type is read by Megatron's MTP layer (which refuses specs without one); MLA is causal.
        self_attention=ModuleSpec(module=MegatronMLA, params={"attn_mask_type": AttnMaskType.causal}),
        self_attn_bda=get_bias_dropout_add, pre_mlp_layernorm=MegatronRMSNorm, mlp=mlp,
        mlp_bda=get_bias_dropout_add)


def get_dsv3_layer_spec(config: Optional[TransformerConfig] = None, layer_number: Optional[int] = None,
                        moe: Optional[bool] = None) -> ModuleSpec:
    """A Megatron TransformerLayer spec with MLA attention and a DeepSeekMoE or dense SwiGLU mlp.

    With `config` and `layer_number` (1-based, global) the mlp follows `moe_layer_freq`;
    `moe=True/False` forces it; with neither, the MoE layer spec.
    """
    if moe is None:
        moe = True if config is None or layer_number is None else bool(_moe_pattern(config)[layer_number - 1])
    mlp = ModuleSpec(module=MegatronDeepSeekMoE if moe else MegatronSwiGLU)
    return ModuleSpec(module=TransformerLayer, submodules=_layer_submodules(mlp))


def get_dsv3_layer_specs(config: TransformerConfig) -> list[ModuleSpec]:
    """One layer spec per layer of the whole model (all pipeline stages)."""
    return [get_dsv3_layer_spec(config, i + 1) for i in range(config.num_layers)]


def get_dsv3_decoder_block_spec(config: TransformerConfig, vp_stage: Optional[int] = None,
                                pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """The decoder block of the layers this pipeline stage builds, plus the final RMSNorm:
    pass it as `GPTModel(config, transformer_layer_spec=...)`."""
    dsv3_config_from_megatron(config)  # refuse unsupported settings before building anything
    check_supported(config)
    specs = get_dsv3_layer_specs(config)
    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout is not None:
        from megatron.core.transformer.enums import LayerType

        local = [specs[i] for i in layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage,
                                                             pp_rank=pp_rank)]
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        local = specs[offset: offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)]
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=MegatronRMSNorm)


def get_dsv3_mtp_block_spec(config: TransformerConfig, vp_stage: Optional[int] = None,
                            pp_rank: Optional[int] = None):
    """Megatron's Multi-Token Prediction block (`mtp_num_layers`) around the DeepSeek-V3 MoE layer
    spec, for `GPTModel(..., mtp_block_spec=...)`; None when the config has no MTP layers or this
    pipeline stage builds none. Megatron's MTP layer supplies the projection (`eh_proj`, a
    ColumnParallelLinear) and the embedding/label shifting; its three norms are this module's
    FP32 RMSNorm, like the rest of the model."""
    if not config.mtp_num_layers:
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    check_supported(config)
    block = get_gpt_mtp_block_spec(config, get_dsv3_layer_spec(config, config.num_layers),
                                   use_transformer_engine=False, vp_stage=vp_stage, pp_rank=pp_rank)
    if block is None:
        return None
    norms = dict(enorm=MegatronRMSNorm, hnorm=MegatronRMSNorm, layer_norm=MegatronRMSNorm)
    block.layer_specs = [dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **norms))
                         for spec in block.layer_specs]
    return block


# Megatron-LM: `--spec megatron_dsv3.model.mcore dsv3_layer_spec` (imported, not called).
dsv3_layer_spec = ModuleSpec(module=DSV3TransformerLayer, params={"dense_mlp": ModuleSpec(module=MegatronSwiGLU)},
                             submodules=_layer_submodules(ModuleSpec(module=MegatronDeepSeekMoE)))


def mtp_block_spec(config: TransformerConfig, vp_stage: Optional[int] = None):
    """The MTP block for Megatron-LM's `gpt_builders.py` patched by patches/megatron-lm-*-gpt_builders-spec-mtp.patch,
    which looks for `mtp_block_spec` in the `--spec` module when `--mtp-num-layers` is set."""
    return get_dsv3_mtp_block_spec(config, vp_stage=vp_stage)


def megatron_lm_spec(args: Any, config: TransformerConfig, vp_stage: Optional[int] = None):
    """For Megatron-LM forks whose model provider calls a callable `--spec` as
    `spec(args, config, vp_stage)` (slime and others)."""
    return get_dsv3_decoder_block_spec(config, vp_stage=vp_stage)


# ------------------------------------------------------------------ weight names
# Whole-model names (PP=1, or a gathered full state dict). Inside a decoder layer the names are
# DSV3Model's except for the four submodule prefixes below; experts, router (weight and
# expert_bias) and every MLA projection keep their DeepSeek names.
_TOP_LEVEL = {"embed_tokens.weight": "embedding.word_embeddings.weight",
              "norm.weight": "decoder.final_layernorm.weight", "lm_head.weight": "output_layer.weight"}
_IN_LAYER = {"self_attn.": "self_attention.", "post_attention_layernorm.": "pre_mlp_layernorm.",
             "input_layernorm.": "input_layernorm.", "mlp.": "mlp."}
# Inside one MTP module: ours (mtp.K.<name>) -> Megatron (mtp.layers.K.<name>); the decoder layer is
# `transformer_layer.` up to megatron-core 0.16 and `mtp_model_layer.` from 0.17 (compat.megatron_api).
_IN_MTP = {"enorm.": "enorm.", "hnorm.": "hnorm.", "eh_proj.": "eh_proj.", "norm.": "final_layernorm.",
           "layer.": "transformer_layer."}
_MTP_LAYER_NAMES = ("transformer_layer.", "mtp_model_layer.")


def _swap_prefix(rest: str, table: dict[str, str], name: str) -> str:
    prefix = next((p for p in table if rest.startswith(p)), None)
    if prefix is None:
        raise KeyError(f"no Megatron/DSV3 name mapping for {name!r}")
    return table[prefix] + rest[len(prefix):]


def _layer_to_megatron(rest: str, name: str) -> str:
    return _swap_prefix(rest, _IN_LAYER, name)


def _layer_to_dsv3(rest: str, name: str) -> str:
    return _swap_prefix(rest, {v: k for k, v in _IN_LAYER.items()}, name)


def dsv3_state_dict_to_megatron(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DSV3Model state-dict names -> GPTModel names (this module's decoder and MTP specs).

    Tensors are passed through unchanged (same shapes and layouts on both sides). Raises
    KeyError for a name it cannot place."""
    out = {}
    for name, value in state.items():
        if name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = value
        elif name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            out[f"decoder.layers.{index}.{_layer_to_megatron(rest, name)}"] = value
        elif name.startswith("mtp."):
            _, index, rest = name.split(".", 2)
            rest = _swap_prefix(rest, _IN_MTP, name)
            if rest.startswith("transformer_layer."):
                rest = f"{mtp_layer_attribute()}." + _layer_to_megatron(rest[len("transformer_layer."):], name)
            out[f"mtp.layers.{index}.{rest}"] = value
        else:
            raise KeyError(f"no Megatron name for DSV3Model entry {name!r}")
    return out


def megatron_state_dict_to_dsv3(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPTModel names (this module's specs) -> DSV3Model names; Megatron's `_extra_state`
    entries (Transformer Engine / FP8 metadata) are dropped."""
    top = {v: k for k, v in _TOP_LEVEL.items()}
    in_mtp = {v: k for k, v in _IN_MTP.items()}
    out = {}
    for name, value in state.items():
        if name.endswith("_extra_state"):
            continue
        if name in top:
            out[top[name]] = value
        elif name.startswith("decoder.layers."):
            _, _, index, rest = name.split(".", 3)
            out[f"layers.{index}.{_layer_to_dsv3(rest, name)}"] = value
        elif name.startswith("mtp.layers."):
            _, _, index, rest = name.split(".", 3)
            layer = next((p for p in _MTP_LAYER_NAMES if rest.startswith(p)), None)
            if layer is not None:
                rest = "layer." + _layer_to_dsv3(rest[len(layer):], name)
            else:
                rest = _swap_prefix(rest, in_mtp, name)
            out[f"mtp.{index}.{rest}"] = value
        else:
            raise KeyError(f"no DSV3Model name for Megatron entry {name!r}")
    return out
