"""Megatron-Core DeepSeek-V3 tensor names <-> ours: of Megatron-Core's own specs, and of this project's specs
inside a GPTModel (`megatron_dsv3.mcore`, at the end of this file).

Megatron-Core's own MLA + MoE layer specs (`get_gpt_decoder_block_spec` with
`multi_latent_attention`, local or Transformer Engine backend) name a decoder layer's tensors

    local spec                                        TE spec (where it differs)             ours
    input_layernorm.weight                                                                   input_layernorm.weight
    self_attention.linear_q_down_proj.weight                                                 self_attn.q_a_proj.weight
    self_attention.q_layernorm.weight                 linear_q_up_proj.layer_norm_weight     self_attn.q_a_layernorm.weight
    self_attention.linear_q_up_proj.weight                                                   self_attn.q_b_proj.weight
    self_attention.linear_q_proj.weight (no q LoRA)                                          self_attn.q_proj.weight
    self_attention.linear_kv_down_proj.weight                                                self_attn.kv_a_proj_with_mqa.weight
    self_attention.kv_layernorm.weight                linear_kv_up_proj.layer_norm_weight    self_attn.kv_a_layernorm.weight
    self_attention.linear_kv_up_proj.weight                                                  self_attn.kv_b_proj.weight
    self_attention.linear_proj.weight                                                        self_attn.o_proj.weight
    pre_mlp_layernorm.weight                          mlp.linear_fc1.layer_norm_weight       post_attention_layernorm.weight
                                                      (dense layers; MoE layers keep pre_mlp_layernorm)
    mlp.linear_fc1.weight [gate; up]                                                         mlp.{gate,up}_proj.weight
    mlp.linear_fc2.weight                                                                    mlp.down_proj.weight
    mlp.router.{weight, expert_bias}                                                         mlp.router.{weight, expert_bias}
    mlp.shared_experts.linear_fc{1,2}.weight                                                 mlp.shared_experts.{gate,up,down}_proj.weight
    mlp.experts.local_experts.{e}.linear_fc1.weight   mlp.experts.linear_fc1.weight{e}       mlp.experts.gate_up_weight[e]
    mlp.experts.local_experts.{e}.linear_fc2.weight   mlp.experts.linear_fc2.weight{e}       mlp.experts.down_weight[e]
    mlp.experts.experts.linear_fc{1,2}.weight [E, ...] (both, in distributed checkpoints)    mlp.experts.{gate_up,down}_weight
    *._extra_state (TE / FP8 metadata)                                                       (dropped)

under `decoder.layers.{i}.` (ours `layers.{i}.`) and `mtp.layers.{k}.transformer_layer.` (0.16) or
`mtp.layers.{k}.mtp_model_layer.` (0.17+) (ours `mtp.{k}.layer.`). Around them:
`embedding.word_embeddings.weight` / `embed_tokens.weight`, `decoder.final_layernorm.weight` /
`norm.weight`, `output_layer.weight` / `lm_head.weight`, `mtp.layers.{k}.{enorm,hnorm,eh_proj}.weight` /
`mtp.{k}.*` (eh_proj's input is [embedding; hidden] on both sides) and
`mtp.layers.{k}.final_layernorm.weight` / `mtp.{k}.norm.weight`.

Megatron's MLA applies rope to de-interleaved rope dimensions, DeepSeek's (and ours) to
interleaved pairs of the same weights: the weights need no permutation (tests/test_convert.py
checks logits of a native GPTModel against ours).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_dsv3.compat.megatron_api import mtp_layer_attribute

_TOP = {"embedding.word_embeddings.weight": "embed_tokens.weight", "decoder.final_layernorm.weight": "norm.weight",
        "output_layer.weight": "lm_head.weight"}
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "final_layernorm.weight": "norm.weight"}
_MTP_LAYER = ("transformer_layer.", "mtp_model_layer.")

# native suffix in a layer -> ours; the TE spec's fused norm names point to the same tensors
_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
    "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "mlp.router.weight",
    "mlp.router.expert_bias": "mlp.router.expert_bias",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight",
    "mlp.experts.experts.linear_fc1.weight": "mlp.experts.gate_up_weight",
    "mlp.experts.experts.linear_fc2.weight": "mlp.experts.down_weight",
}
_STACKED = {"mlp.linear_fc1.weight": "mlp.", "mlp.shared_experts.linear_fc1.weight": "mlp.shared_experts."}
_EXPERT = [(re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight"), "local"),
           (re.compile(r"mlp\.experts\.linear_fc([12])\.weight(\d+)"), "grouped")]


@dataclass(frozen=True)
class Piece:
    """Rows [row_start, row_stop) of a native tensor are our tensor `key` at `offsets`; `expert`:
    the native tensor is one expert's matrix, our tensor has the expert dim in front."""

    key: str
    offsets: tuple[int, ...]
    row_start: int
    row_stop: Optional[int]  # None: to the end
    expert: bool = False


class NativeNameError(KeyError):
    """A native Megatron-Core name with no place in our model; the message names it."""


def is_extra_state(name: str) -> bool:
    return "._extra_state" in name or name.endswith("_extra_state")


def _split(prefix: str, rows: int, dims: int) -> list[Piece]:
    half = rows // 2
    zero = (0,) * dims
    return [Piece(f"{prefix}gate_proj.weight", zero, 0, half), Piece(f"{prefix}up_proj.weight", zero, half, rows)]


def _in_layer(ours: str, rest: str, shape: tuple[int, ...], name: str) -> list[Piece]:
    if rest in _LAYER:
        return [Piece(ours + _LAYER[rest], (0,) * len(shape), 0, None)]
    if rest in _STACKED:
        return _split(ours + _STACKED[rest], shape[0], len(shape))
    for pattern, kind in _EXPERT:
        m = pattern.fullmatch(rest)
        if m:
            expert, fc = (int(m[1]), m[2]) if kind == "local" else (int(m[2]), m[1])
            key = ours + ("mlp.experts.gate_up_weight" if fc == "1" else "mlp.experts.down_weight")
            return [Piece(key, (expert, 0, 0), 0, None, expert=True)]
    raise NativeNameError(f"no place in our model for the native Megatron-Core tensor {name!r}")


def native_pieces(name: str, shape: tuple[int, ...]) -> list[Piece]:
    """Where native tensor `name` (of `shape`) goes in our model; [] for `_extra_state`."""
    if is_extra_state(name):
        return []
    if name in _TOP:
        return [Piece(_TOP[name], (0,) * len(shape), 0, None)]
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    if m:
        return _in_layer(f"layers.{m[1]}.", m[2], shape, name)
    m = re.fullmatch(r"mtp\.layers\.(\d+)\.(.+)", name)
    if m:
        if m[2] in _MTP_OWN:
            return [Piece(f"mtp.{m[1]}.{_MTP_OWN[m[2]]}", (0,) * len(shape), 0, None)]
        layer = next((p for p in _MTP_LAYER if m[2].startswith(p)), None)
        if layer is not None:
            return _in_layer(f"mtp.{m[1]}.layer.", m[2][len(layer):], shape, name)
    raise NativeNameError(f"no place in our model for the native Megatron-Core tensor {name!r}")


def native_checkpoint_names(our_shapes: dict[str, tuple[int, ...]], te: bool, mtp_layer: str,
                            dense_layers: set[int]) -> dict[str, tuple[int, ...]]:
    """The native distributed-checkpoint tensor names and shapes for our model's tensors (local spec
    names, or the TE spec's fused norm names with `te`); `dense_layers` are the first-k dense layer
    indices (their TE post-attention norm is fused into linear_fc1)."""
    out: dict[str, tuple[int, ...]] = {}
    ours_to_native = {v: k for k, v in _TOP.items()}
    for key, shape in our_shapes.items():
        if key in ours_to_native:
            out[ours_to_native[key]] = shape
            continue
        m = re.fullmatch(r"(layers\.(\d+)\.|mtp\.(\d+)\.layer\.)(.+)", key)
        if m is None:
            m2 = re.fullmatch(r"mtp\.(\d+)\.(.+)", key)
            own = {v: k for k, v in _MTP_OWN.items()}
            out[f"mtp.layers.{m2[1]}.{own[m2[2]]}"] = shape
            continue
        prefix = f"decoder.layers.{m[2]}." if m[2] is not None else f"mtp.layers.{m[3]}.{mtp_layer}."
        rest, dense = m[4], m[2] is not None and int(m[2]) in dense_layers
        if rest.endswith(("gate_proj.weight", "up_proj.weight")):
            stacked = "mlp.linear_fc1.weight" if rest.startswith("mlp.gate") or rest.startswith("mlp.up") \
                else "mlp.shared_experts.linear_fc1.weight"
            rows = out.get(prefix + stacked, (0, *shape[1:]))
            out[prefix + stacked] = (rows[0] + shape[0], *shape[1:])
            continue
        choices = [n for n, o in _LAYER.items() if o == rest]
        if te:
            fused = {"self_attn.q_a_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
                     "self_attn.kv_a_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight"}
            if dense:
                fused["post_attention_layernorm.weight"] = "mlp.linear_fc1.layer_norm_weight"
            name = fused.get(rest, choices[0])
        else:
            name = choices[0]
        out[prefix + name] = shape
    return out


# ---------------------------------------------------- this project's specs inside a GPTModel
# (`megatron_dsv3.mcore`): the same tensors as DSV3Model's under Megatron's module prefixes.
# Whole-model names (PP=1, or a gathered full state dict). Inside a decoder layer the names are
# DSV3Model's except for the four submodule prefixes below; experts, router (weight and
# expert_bias) and every MLA projection keep their DeepSeek names.
_TOP_LEVEL = {ours: native for native, ours in _TOP.items()}
_IN_LAYER = {"self_attn.": "self_attention.", "post_attention_layernorm.": "pre_mlp_layernorm.",
             "input_layernorm.": "input_layernorm.", "mlp.": "mlp."}
# Inside one MTP module: ours (mtp.K.<name>) -> Megatron (mtp.layers.K.<name>); the decoder layer is
# `transformer_layer.` up to megatron-core 0.16 and `mtp_model_layer.` from 0.17 (compat.megatron_api).
_IN_MTP = {"enorm.": "enorm.", "hnorm.": "hnorm.", "eh_proj.": "eh_proj.", "norm.": "final_layernorm.",
           "layer.": "transformer_layer."}


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
            layer = next((p for p in _MTP_LAYER if rest.startswith(p)), None)
            if layer is not None:
                rest = "layer." + _layer_to_dsv3(rest[len(layer):], name)
            else:
                rest = _swap_prefix(rest, in_mtp, name)
            out[f"mtp.{index}.{rest}"] = value
        else:
            raise KeyError(f"no DSV3Model name for Megatron entry {name!r}")
    return out
