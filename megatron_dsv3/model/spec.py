"""Megatron-Core ModuleSpecs of the DeepSeek-V3 decoder layer.

A layer is pre-norm attention then pre-norm feed-forward; which attention and which
feed-forward are chosen by the spec, so a user swaps MLA or DeepSeekMoE for their own module
by editing a ModuleSpec, not the model:

    spec = decoder_layer_spec(config, layer_number=5)
    spec.submodules.mlp = ModuleSpec(module=MyMoE, params={"config": config})
"""
from __future__ import annotations

import functools
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

    def forward(self, x_BSH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[InferenceCache] = None) -> torch.Tensor:
        """Pre-norm residual blocks: u = x + Attention(RMSNorm(x)), then u + FFN(RMSNorm(u))."""
        u_BSH = self.attention(x_BSH, cos, sin, cache)
        return u_BSH + self.mlp(self.post_attention_layernorm(u_BSH))

    def attention(self, x_BSH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cache: Optional[InferenceCache] = None) -> torch.Tensor:
        """x + Attention(RMSNorm(x)); under selective recomputation (training) the norm and MLA's
        projections rerun in backward."""
        if self.selective_recompute and cache is None:
            q, k, v = recomputed(True, functools.partial(self.normed_projection, cos=cos, sin=sin), x_BSH)
            return x_BSH + self.self_attn.attend(q, k, v)
        return x_BSH + self.self_attn(self.input_layernorm(x_BSH), cos, sin, cache)

    def normed_projection(self, x_BSH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """MLA's queries, keys and values of RMSNorm(x) (what selective recomputation reruns)."""
        return self.self_attn.project(self.input_layernorm(x_BSH), cos, sin)


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
