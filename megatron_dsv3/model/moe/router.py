"""DeepSeekMoE routing with auxiliary-loss-free load balancing (report section 2.1.2).

  s_i = sigmoid(u . e_i)                                   affinities, eq. 15
  top-k over s_i + b_i, inside the best `num_limited_groups` groups   eq. 16 (node-limited: 2.1.2)
  g_i = s_i / sum_{j in top-k} s_j * routed_scaling_factor  gates use the UNBIASED s_i, eq. 13
  b_i += gamma * sign(mean load - load_i) after each step    bias update, section 2.1.2
  L_bal = alpha * sum_i f_i P_i per sequence                 complementary loss, eq. 17-20

The bias only changes which experts are chosen; it never enters the gates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.parallel import comm


@dataclass
class Routing:
    expert_ids: torch.Tensor  # [tokens, top_k] int64
    gates: torch.Tensor  # [tokens, top_k] fp32, differentiable
    balance_loss: Optional[torch.Tensor]  # scalar, or None when alpha == 0 / not training


class Router(nn.Module):
    def __init__(self, config: DSV3Config):
        super().__init__()
        self.config = config
        self.count_load = True  # off while a recomputed layer replays its forward (model/gpt.py)
        self.weight = nn.Parameter(torch.empty(config.num_routed_experts, config.hidden_size))
        # Persistent: the bias is training state and is saved with the model (HF: e_score_correction_bias).
        self.register_buffer("expert_bias", torch.zeros(config.num_routed_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last bias update, summed over micro-batches.
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_routed_experts), persistent=False)
        # For monitoring: the summed entropy of the tokens' affinity distributions since the last bias
        # update, and its mean over the global batch as that update leaves it (monitor/expert_load.py).
        self.register_buffer("routing_entropy_sum", torch.zeros(()), persistent=False)
        self.routing_entropy: Optional[torch.Tensor] = None

    def forward(self, x_BSH: torch.Tensor) -> Routing:
        """x [batch, seq, hidden] -> Routing over the batch*seq tokens (in that order)."""
        cfg = self.config
        batch, seq = x_BSH.shape[:2]
        scores_TE = torch.sigmoid(x_BSH.reshape(batch * seq, -1).float() @ self.weight.float().t())
        expert_ids = self.select(scores_TE.detach())
        chosen = scores_TE.gather(1, expert_ids)
        gates = chosen / chosen.sum(dim=-1, keepdim=True) * cfg.routed_scaling_factor
        if self.training and self.count_load:
            ids = expert_ids.flatten()  # not torch.bincount: on CUDA it reads the largest id on the host
            self.tokens_per_expert.index_add_(0, ids, torch.ones_like(ids, dtype=self.tokens_per_expert.dtype))
            with torch.no_grad():
                p_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
                self.routing_entropy_sum -= (p_TE * p_TE.clamp_min(1e-30).log()).sum()
        balance_loss = None
        if self.training and cfg.seq_aux_loss_coeff > 0:
            balance_loss = self.sequence_balance_loss(scores_TE.view(batch, seq, -1), expert_ids.view(batch, seq, -1))
        return Routing(expert_ids, gates, balance_loss)

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Group-limited top-k on the biased scores -> expert ids [tokens, top_k]."""
        cfg = self.config
        biased = scores_TE + self.expert_bias
        if cfg.num_limited_groups < cfg.num_expert_groups:
            grouped = biased.view(biased.shape[0], cfg.num_expert_groups, -1)  # [T, groups, experts/group]
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            kept = group_scores.topk(cfg.num_limited_groups, dim=-1).indices
            keep_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            biased = grouped.masked_fill(~keep_mask.unsqueeze(-1), float("-inf")).flatten(1)
        return biased.topk(cfg.num_experts_per_token, dim=-1).indices

    def sequence_balance_loss(self, scores_BSE: torch.Tensor, expert_ids_BSK: torch.Tensor) -> torch.Tensor:
        """alpha * sum_i f_i P_i, averaged over the sequences of the batch (eq. 17-20)."""
        cfg = self.config
        batch, seq, experts = scores_BSE.shape
        counts_BE = torch.zeros(batch, experts, device=scores_BSE.device)
        counts_BE.scatter_add_(1, expert_ids_BSK.flatten(1), torch.ones_like(expert_ids_BSK.flatten(1), dtype=counts_BE.dtype))
        f_BE = counts_BE * experts / (cfg.num_experts_per_token * seq)
        p_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)).mean(dim=1)
        return cfg.seq_aux_loss_coeff * (f_BE * p_BE).sum(dim=-1).mean()


@torch.no_grad()
def update_expert_bias(routers: Iterable[Router], rate: float, group: Optional[dist.ProcessGroup] = None) -> list[torch.Tensor]:
    """Aux-loss-free bias step from the load of the whole global batch.

    Sums each router's token counts over `group` (the data-parallel ranks, which hold different
    tokens), so every rank applies the same step. Returns the global counts per router [E] and
    clears them. The summed routing entropy rides in the same collective; each router keeps its
    global mean per token in `routing_entropy` (on device, for monitoring).
    """
    routers = list(routers)
    if not routers:
        return []
    # [layers, experts + 1]: the counts, then the summed routing entropy
    counts = torch.stack([torch.cat([r.tokens_per_expert, r.routing_entropy_sum.view(1)]) for r in routers])
    if group is not None and dist.get_world_size(group) > 1:
        comm.all_reduce(counts, group)
    loads = []
    for router, row in zip(routers, counts):
        load, entropy_sum = row[:-1], row[-1]
        if rate > 0:
            router.expert_bias += rate * torch.sign(load.mean() - load)
        tokens = load.sum() / router.config.num_experts_per_token
        router.routing_entropy = entropy_sum / tokens.clamp_min(1)
        router.tokens_per_expert.zero_()
        router.routing_entropy_sum.zero_()
        loads.append(load)
    return loads
