"""Megatron-Core ModuleSpecs of DeepSeek-V3 built from the adapters in `layers.py`.

`get_dsv3_decoder_block_spec` / `get_dsv3_mtp_block_spec` are what a GPTModel takes. For
Megatron-LM's `--spec MODULE NAME` the module-level `dsv3_layer_spec` is a single layer spec whose
layer class picks dense or MoE from `moe_layer_freq` by its global layer number (releases that
pass the object on uncalled), and `dsv3_block_spec` the per-stage block for releases and forks
that call it; `mtp_block_spec` is what the patched builders (patches/) use for `--mtp-num-layers`.
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

from megatron_dsv3.mcore.config import check_supported, dsv3_config_from_megatron, moe_pattern
from megatron_dsv3.mcore.layers import (DSV3TransformerLayer, MegatronDeepSeekMoE, MegatronMLA, MegatronRMSNorm,
                                        MegatronSwiGLU, check_mtp_layer)
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
    instead (`layers.check_mtp_layer`)."""
    mtp = getattr(model, "mtp", None)
    for index, layer in enumerate(mtp.layers if mtp is not None else ()):
        check_mtp_layer(layer, index)


def mtp_block_spec(config: TransformerConfig, vp_stage: Optional[int] = None):
    """The MTP block for Megatron-LM's `gpt_builders.py` (0.16-0.18) patched by
    patches/megatron-lm-0.16-0.17-gpt_builders-spec-mtp.patch or -0.18-: it looks for `mtp_block_spec`
    in the `--spec` module when `--mtp-num-layers` is set."""
    return get_dsv3_mtp_block_spec(_transformer_config(config), vp_stage=vp_stage)


def _transformer_config(config: Any) -> TransformerConfig:
    # Megatron-LM 0.19's models/gpt.py passes its GPTModelConfig, which holds the TransformerConfig.
    return getattr(config, "transformer", config)


@dataclasses.dataclass
class DSV3LayerSpec(ModuleSpec):
    """A layer ModuleSpec (what `--spec` objects that are not called must be) that also builds the
    MTP block: Megatron-LM 0.19's models/gpt.py patched by patches/megatron-lm-0.19-models_gpt-spec-mtp.patch
    asks the `--spec` object for `mtp_block_spec(config, vp_stage=...)`."""

    def mtp_block_spec(self, config: Any, vp_stage: Optional[int] = None):
        return mtp_block_spec(config, vp_stage=vp_stage)


class DSV3BlockSpec:
    """A callable `--spec`: the decoder block of one pipeline stage, in either calling convention,

        spec(config, vp_stage=vp_stage)          Megatron-LM 0.19 (models/gpt.py; config: GPTModelConfig)
        spec(args, config, vp_stage)             Megatron-LM forks (slime and others)

    and, like `DSV3LayerSpec`, `mtp_block_spec(config, vp_stage=...)` for the patched 0.19 builder."""

    def __call__(self, *arguments: Any, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
        if len(arguments) == 1:
            config = arguments[0]
        elif len(arguments) in (2, 3):
            config = arguments[1]
            vp_stage = arguments[2] if len(arguments) == 3 else vp_stage
        else:
            raise TypeError(f"a --spec block takes (config, vp_stage=...) or (args, config, vp_stage), got "
                            f"{len(arguments)} positional arguments")
        return get_dsv3_decoder_block_spec(_transformer_config(config), vp_stage=vp_stage)

    def mtp_block_spec(self, config: Any, vp_stage: Optional[int] = None):
        return mtp_block_spec(config, vp_stage=vp_stage)


# Megatron-LM's `--spec megatron_dsv3.mcore.specs NAME`:
#   dsv3_layer_spec   imported and passed on uncalled (every release): one layer spec for every layer
#   dsv3_block_spec   called as spec(config, vp_stage=...) by 0.19, spec(args, config, vp_stage) by forks
#   megatron_lm_spec  the name forks were told to use; the same object
dsv3_layer_spec = DSV3LayerSpec(module=DSV3TransformerLayer, params={"dense_mlp": MegatronSwiGLU},
                                submodules=_layer_submodules(MegatronDeepSeekMoE))
dsv3_block_spec = megatron_lm_spec = DSV3BlockSpec()


registry.register("layer_spec", "megatron-gpt", get_dsv3_decoder_block_spec)
registry.register("layer_spec", "megatron-gpt-mtp", get_dsv3_mtp_block_spec)
