"""Multi-Token Prediction (report section 2.2, eq. 21-25).

Module k (1-based) sees the previous depth's hidden state h^{k-1} and the embedding of the token
k positions ahead, and predicts the token k+1 ahead:
  h'_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1})]     (eq. 21; concatenation in the
                                                              order of DeepSeek's checkpoints)
  h^k = TRM_k(h')                                              (eq. 22)
  P^k = OutHead(norm(h^k))                                     (eq. 23, head shared)
  L_MTP = lambda / D * sum_k CE(P^k, t_{i+k+1})                (eq. 24-25)
The embedding and output head are the main model's; the last k positions have no target.

For monitoring, each module counts on its device, while training, its loss and how often its
top-1 prediction is the true token (for depth 1, the token after next: the acceptance rate of
speculative decoding with that head, report section 5.4.3); `take_stats` reads and clears them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model.common import Linear, RMSNorm


class MTPModule(nn.Module):
    def __init__(self, config: DSV3Config, layer_spec: ModuleSpec):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.layer = build_module(layer_spec)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        # [loss sum, losses added, top-1 hits, targets] since the last `take_stats`
        self.register_buffer("stats", torch.zeros(4), persistent=False)

    def forward(self, hidden: torch.Tensor, future_embedding: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """hidden, future_embedding [b, s, hidden] -> (h^k [b, s, hidden], normed for the head)."""
        h = self.layer(self.merge_inputs(hidden, future_embedding), cos, sin)
        return h, self.norm(h)

    def merge_inputs(self, hidden: torch.Tensor, future_embedding: torch.Tensor) -> torch.Tensor:
        """Eq. 21: M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1})]."""
        return self.eh_proj(torch.cat([self.enorm(future_embedding), self.hnorm(hidden)], dim=-1))


def shift_left(tokens_BS: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """tokens[:, i + k], padded with `fill` past the end."""
    return F.pad(tokens_BS[:, k:], (0, k), value=fill)


def mtp_loss(modules: nn.ModuleList, hidden: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
             embed: nn.Module, head, cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
    """Per-depth mean cross-entropies [L^1, ..., L^D] (unweighted), from h^0 = `hidden`.

    tokens [b, s] are the inputs t_1..t_s, labels [b, s] = t_2..t_{s+1}; depth k at position i
    embeds t_{i+k+1} = labels[i + k - 1] and predicts labels[i + k]."""
    losses = []
    for k, module in enumerate(modules, start=1):
        hidden = module.layer(depth_input(module, hidden, labels, embed, k), cos, sin)  # eq. 21-22
        losses.append(depth_loss(module, head, hidden, labels, k))  # eq. 23-24
    return losses


def depth_input(module: MTPModule, hidden: torch.Tensor, labels: torch.Tensor, embed: nn.Module, k: int) -> torch.Tensor:
    """Eq. 21 at depth k: h^{k-1} merged with the embedding of the tokens k ahead."""
    return module.merge_inputs(hidden, embed(shift_left(labels, k - 1, fill=0)))


def depth_loss(module: MTPModule, head, h: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """CE(OutHead(norm(h^k)), t_{i+k+1}) (eq. 23-24), counting the module's monitoring stats."""
    target = shift_left(labels, k, fill=-100)  # the last k positions have no target
    logits = head(module.norm(h))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    if module.training:
        with torch.no_grad():
            valid = target != -100
            hits = ((logits.argmax(dim=-1) == target) & valid).sum()
            module.stats += torch.stack([loss.detach().float(), torch.ones_like(module.stats[0]),
                                         hits.to(module.stats.dtype), valid.sum().to(module.stats.dtype)])
    return loss


@torch.no_grad()
def take_stats(modules: nn.ModuleList, depth: int, device: torch.device) -> torch.Tensor:
    """[depth, 4] of this rank's modules' (loss sum, losses added, top-1 hits, targets) since the
    last call, cleared; zeros where this rank holds no MTP module (a stage before the last)."""
    stats = torch.zeros(depth, 4, device=device)
    for k, module in enumerate(modules):
        stats[k] = module.stats
        module.stats.zero_()
    return stats
