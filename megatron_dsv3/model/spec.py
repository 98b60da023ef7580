"""Megatron-Core ModuleSpecs of the DeepSeek-V3 decoder layer.

A layer is pre-norm attention then pre-norm feed-forward; which attention and which
feed-forward are chosen by the spec, so a user swaps MLA or DeepSeekMoE for their own module
by editing a ModuleSpec, not the model:

    spec = decoder_layer_spec(config, layer_number=5)
    spec.submodules.mlp = ModuleSpec(module=MyMoE, params={"config": config})
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from megatron_dsv3 import registry
from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model.common import RMSNorm, SwiGLU, recomputed
from megatron_dsv3.model.mla import InferenceCache, MultiLatentAttention
from megatron_dsv3.model.moe.layer import DeepSeekMoE
from megatron_dsv3.model.pieces import COMPUTE, Piece, own_pieces, run_in_order


@dataclass
class DecoderLayerSubmodules:
    self_attention: Union[ModuleSpec, type]
    mlp: Union[ModuleSpec, type]


class DecoderLayer(nn.Module):
    def __init__(self, config: DSV3Config, layer_number: int, submodules: DecoderLayerSubmodules):
        super().__init__()
        self.layer_number = layer_number
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = build_module(submodules.self_attention)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = build_module(submodules.mlp)
        # Selective recomputation (report section 3.2.3): the attention RMSNorm and MLA's
        # compressions, norms and up-projections rerun in backward; only the layer input is kept.
        self.selective_recompute = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[InferenceCache] = None) -> torch.Tensor:
        return run_in_order(self.pieces(cos, sin, cache), {"hidden": x})["hidden"]

    def pieces(self, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[InferenceCache] = None) -> list[Piece]:
        """The layer from the state's "hidden" to its next "hidden" as pieces (`model/pieces.py`):
        attention, then the feed-forward's own pieces where it has them (DeepSeekMoE: route,
        dispatch, experts, combine, merge), then the residual sum."""

        def attention(state):
            x = state["hidden"]
            if self.selective_recompute and cache is None:
                q, k, v = recomputed(True, lambda x_: self.self_attn.project(self.input_layernorm(x_), cos, sin), x)
                x = x + self.self_attn.attend(q, k, v)
            else:
                x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
            return {"residual": x, "mlp_input": self.post_attention_layernorm(x)}

        mlp = own_pieces(self.mlp) or [Piece("mlp", COMPUTE, lambda state: {"mlp_output": self.mlp(state["mlp_input"])})]
        residual = Piece("residual", COMPUTE, lambda state: {"hidden": state["residual"] + state["mlp_output"]})
        return [Piece("attention", COMPUTE, attention), *mlp, residual]


def attention_spec(config: DSV3Config, layer_number: int) -> ModuleSpec:
    return ModuleSpec(module=MultiLatentAttention, params={"config": config, "layer_number": layer_number})


def mlp_spec(config: DSV3Config, layer_number: int) -> ModuleSpec:
    """Dense SwiGLU for the first `first_k_dense_layers` layers, DeepSeekMoE afterwards."""
    if config.is_moe_layer(layer_number):
        return ModuleSpec(module=DeepSeekMoE, params={"config": config, "layer_number": layer_number})
    return ModuleSpec(module=SwiGLU, params={"hidden_size": config.hidden_size,
                                             "ffn_hidden_size": config.dense_ffn_hidden_size})


def decoder_layer_spec(config: DSV3Config, layer_number: int) -> ModuleSpec:
    """Layer `layer_number` (0-based; MTP layers continue after num_layers - 1)."""
    return ModuleSpec(
        module=DecoderLayer,
        params={"config": config, "layer_number": layer_number},
        submodules=DecoderLayerSubmodules(self_attention=attention_spec(config, layer_number),
                                          mlp=mlp_spec(config, layer_number)))


registry.register("layer_spec", "dsv3", decoder_layer_spec)
