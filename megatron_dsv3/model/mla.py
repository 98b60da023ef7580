"""Multi-head Latent Attention (report section 2.1.1, equations 1-11).

Keys and values are generated from one compressed latent c_KV (kv_lora_rank wide) plus one
rotary key shared by all heads, so inference caches kv_lora_rank + qk_rope_head_dim numbers per
token and layer. Heads are split over tensor-parallel ranks; the down-projections and their
norms are replicated, and the latents enter the parallel region right after them.

Parameter names follow DeepSeek's checkpoints (q_a_proj, kv_a_proj_with_mqa, kv_b_proj, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model.common import Linear, RMSNorm, column_parallel_linear, row_parallel_linear
from megatron_dsv3.model.rope import apply_rope
from megatron_dsv3.parallel import groups
from megatron_dsv3.parallel.collectives import copy_to_group, reduce_from_group


@dataclass
class LatentCache:
    """The absorbed-attention cache of one layer: the normalised latent and the rotary key."""

    latent: Optional[torch.Tensor] = None  # [batch, tokens, kv_lora_rank]
    rope_key: Optional[torch.Tensor] = None  # [batch, tokens, qk_rope_head_dim]

    def append(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.latent = latent if self.latent is None else torch.cat([self.latent, latent], dim=1)
        self.rope_key = rope_key if self.rope_key is None else torch.cat([self.rope_key, rope_key], dim=1)
        return self.latent, self.rope_key

    @property
    def elements_per_token(self) -> int:
        return self.latent.shape[-1] + self.rope_key.shape[-1]


@dataclass
class InferenceCache:
    """Latent caches of every layer plus the number of tokens already seen."""

    layers: dict[int, LatentCache] = field(default_factory=dict)
    offset: int = 0

    def layer(self, layer_number: int) -> LatentCache:
        return self.layers.setdefault(layer_number, LatentCache())


class MultiLatentAttention(nn.Module):
    def __init__(self, config: DSV3Config, layer_number: int = 0):
        super().__init__()
        self.config, self.layer_number = config, layer_number
        self.tp_group = groups.tp_group()
        tp = groups.size(self.tp_group)
        self.local_heads = config.num_attention_heads // tp
        h, c = config.hidden_size, config.qk_head_dim
        if config.q_lora_rank > 0:
            self.q_a_proj = Linear(h, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.norm_eps)
            self.q_b_proj = column_parallel_linear(config.q_lora_rank, config.num_attention_heads * c, tp)
        else:
            self.q_proj = column_parallel_linear(h, config.num_attention_heads * c, tp)
        self.kv_a_proj_with_mqa = Linear(h, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.norm_eps)
        self.kv_b_proj = column_parallel_linear(
            config.kv_lora_rank, config.num_attention_heads * (config.qk_nope_head_dim + config.v_head_dim), tp)
        self.o_proj = row_parallel_linear(config.num_attention_heads * config.v_head_dim, h, tp)

    def _query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [b, s, hidden] -> q_nope [b, s, heads, nope], q_rope [b, s, heads, rope] (rotated)."""
        cfg = self.config
        if cfg.q_lora_rank > 0:
            q = self.q_b_proj(copy_to_group(self.q_a_layernorm(self.q_a_proj(x)), self.tp_group))
        else:
            q = self.q_proj(copy_to_group(x, self.tp_group))
        q = q.unflatten(-1, (self.local_heads, cfg.qk_head_dim))
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def _latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x -> c_KV [b, s, kv_lora_rank] (normalised), k_rope [b, s, rope] (rotated, shared by heads)."""
        cfg = self.config
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = copy_to_group(self.kv_a_layernorm(latent), self.tp_group)
        k_rope = copy_to_group(apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2), self.tp_group)
        return latent, k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[InferenceCache] = None) -> torch.Tensor:
        """x [b, s, hidden]; cos/sin [s, rope/2] for the positions of x. Returns [b, s, hidden]."""
        if cache is not None:
            return self._forward_absorbed(x, cos, sin, cache.layer(self.layer_number), cache.offset)
        return self.attend(*self.project(x, cos, sin))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [b, s, hidden] -> q, k [b, s, heads, nope + rope], v [b, s, heads, v]: the compressions,
        their RMSNorms and the up-projections (what selective recomputation reruns in backward)."""
        cfg = self.config
        q_nope, q_rope = self._query(x, cos, sin)
        latent, k_rope = self._latent(x, cos, sin)
        kv = self.kv_b_proj(latent).unflatten(-1, (self.local_heads, cfg.qk_nope_head_dim + cfg.v_head_dim))
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.local_heads, -1)], dim=-1)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of this rank's heads and the output projection -> [b, s, hidden]."""
        cfg = self.config
        # V zero-padded to the query/key head size: SDPA's fused kernels (CPU flash, GPU flash) want
        # one head size; with V narrower it falls back to its slower math path. The pad's output
        # columns are zeros and are sliced off.
        pad = q.shape[-1] - v.shape[-1]
        v_wide = F.pad(v, (0, pad)) if pad > 0 else v
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v_wide.transpose(1, 2),
                                             is_causal=True, scale=cfg.softmax_scale)  # [b, heads, s, qk]
        out = self.o_proj(out[..., :cfg.v_head_dim].transpose(1, 2).flatten(2))
        return reduce_from_group(out, self.tp_group)

    def _forward_absorbed(self, x, cos, sin, layer_cache: LatentCache, offset: int) -> torch.Tensor:
        """Inference: W_UK folded into the query and W_UV applied after the attention sum, so
        attention runs against the cached latents directly (no per-head keys or values)."""
        cfg = self.config
        q_nope, q_rope = self._query(x, cos, sin)
        latent, k_rope = layer_cache.append(*self._latent(x, cos, sin))  # [b, t, c], [b, t, rope]
        w_kv = self.kv_b_proj.weight.unflatten(0, (self.local_heads, -1))  # [heads, nope + v, c]
        w_uk, w_uv = w_kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        scores = (torch.einsum("bshc,btc->bhst", q_latent, latent)
                  + torch.einsum("bshr,btr->bhst", q_rope, k_rope)) * cfg.softmax_scale
        query_pos = offset + torch.arange(x.shape[1], device=x.device)
        key_pos = torch.arange(latent.shape[1], device=x.device)
        scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(x.dtype)
        out_latent = torch.einsum("bhst,btc->bshc", probs, latent)
        out = torch.einsum("bshc,hdc->bshd", out_latent, w_uv).flatten(2)
        return reduce_from_group(self.o_proj(out), self.tp_group)
