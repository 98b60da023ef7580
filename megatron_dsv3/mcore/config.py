"""A DeepSeek-V3 model described as Megatron-Core describes it, and back.

`megatron_config_from_dsv3` writes a DSV3Config as the MLATransformerConfig Megatron's GPTModel
takes; `dsv3_config_from_megatron` reads one (refusing what DeepSeek-V3 is not: softmax routing,
non-first-k-dense layouts, ...); `check_supported` refuses the Megatron features the adapters in
`layers.py` do not implement, naming the field.

First-k-dense is expressed as Megatron does it: `config.moe_layer_freq` as a list
([0]*k + [1]*(L-k)).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_dsv3.compat.megatron_api import build_megatron_config, config_value
from megatron_dsv3.config import ConfigError, DSV3Config, YarnConfig

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


def moe_pattern(config: TransformerConfig) -> list[int]:
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
    pattern = moe_pattern(config)
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
