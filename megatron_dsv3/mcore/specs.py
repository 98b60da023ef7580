"""Megatron-Core ModuleSpecs of DeepSeek-V3 built from the adapters in `layers.py`.

`get_dsv3_decoder_block_spec` / `get_dsv3_mtp_block_spec` are what a GPTModel takes. For
Megatron-LM's `--spec MODULE NAME` (which passes the named object to GPTModel without calling
it) the module-level `dsv3_layer_spec` is a single layer spec whose layer class picks dense or MoE
from `moe_layer_freq` by its global layer number; `mtp_block_spec` is what the patched
`gpt_builders.py` (patches/) looks for in the `--spec` module.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.enums import AttnMaskType, LayerType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_dsv3.compat.megatron_api import mtp_layer_attribute
from megatron_dsv3.config import ConfigError
from megatron_dsv3.mcore.config import check_supported, dsv3_config_from_megatron, moe_pattern
from megatron_dsv3.mcore.layers import (DSV3TransformerLayer, MegatronDeepSeekMoE, MegatronMLA, MegatronRMSNorm,
                                        MegatronSwiGLU)
from megatron_dsv3 import registry


def _layer_submodules(mlp: type) -> TransformerLayerSubmodules:
    # `mlp` is a class, not a ModuleSpec: Megatron-Core 0.16-0.17's TransformerLayer logs "Unknown MLP
    # type ... Using default kwargs." for every layer whose mlp ModuleSpec names a class it does not
    # know, and passes no extra arguments to a bare class either.
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
        moe = True if config is None or layer_number is None else bool(moe_pattern(config)[layer_number - 1])
    return ModuleSpec(module=TransformerLayer, submodules=_layer_submodules(MegatronDeepSeekMoE if moe else MegatronSwiGLU))


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
    # imported here: the module warns at import that Apex is missing, which `import megatron_dsv3` should not print
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


def check_mtp_layers(model: Any) -> None:
    """Refuse a model whose Multi-Token Prediction layers are not this plugin's, naming what was built
    instead: Megatron-LM's builders make MTP layers from Megatron's own specs unless told
    otherwise (`--spec` on 0.19 without patches/megatron-lm-0.19-models_gpt-spec-mtp.patch)."""
    mtp = getattr(model, "mtp", None)
    if mtp is None:
        return
    for index, layer in enumerate(mtp.layers):
        inner = getattr(layer, mtp_layer_attribute())
        found = {"self_attention": inner.self_attention, "mlp": inner.mlp, "enorm": layer.enorm,
                 "hnorm": layer.hnorm, "final_layernorm": layer.final_layernorm}
        wanted = {"self_attention": (MegatronMLA,), "mlp": (MegatronDeepSeekMoE, MegatronSwiGLU),
                  "enorm": (MegatronRMSNorm,), "hnorm": (MegatronRMSNorm,), "final_layernorm": (MegatronRMSNorm,)}
        foreign = [f"{name}={type(module).__module__}.{type(module).__name__}" for name, module in found.items()
                   if not isinstance(module, wanted[name])]
        if foreign:
            raise ConfigError(f"MTP layer {index} was built from Megatron's own specs, not megatron_dsv3's "
                              f"({', '.join(foreign)}): build it with mtp_block_spec=get_dsv3_mtp_block_spec(config) "
                              "(with Megatron-LM: examples/megatron_lm/pretrain_dsv3.py, or pretrain_gpt.py --spec "
                              "patched by patches/ for your release)")


# Megatron-LM: `--spec megatron_dsv3.mcore.specs dsv3_layer_spec` (imported, not called).
dsv3_layer_spec = ModuleSpec(module=DSV3TransformerLayer, params={"dense_mlp": MegatronSwiGLU},
                             submodules=_layer_submodules(MegatronDeepSeekMoE))


def mtp_block_spec(config: TransformerConfig, vp_stage: Optional[int] = None):
    """The MTP block for Megatron-LM's `gpt_builders.py` patched by patches/megatron-lm-*-gpt_builders-spec-mtp.patch,
    which looks for `mtp_block_spec` in the `--spec` module when `--mtp-num-layers` is set."""
    return get_dsv3_mtp_block_spec(config, vp_stage=vp_stage)


def megatron_lm_spec(args: Any, config: TransformerConfig, vp_stage: Optional[int] = None):
    """For Megatron-LM forks whose model provider calls a callable `--spec` as
    `spec(args, config, vp_stage)` (slime and others)."""
    return get_dsv3_decoder_block_spec(config, vp_stage=vp_stage)


registry.register("layer_spec", "megatron-gpt", get_dsv3_decoder_block_spec)
registry.register("layer_spec", "megatron-gpt-mtp", get_dsv3_mtp_block_spec)
