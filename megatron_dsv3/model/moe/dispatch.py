"""Token dispatch to the experts and combine back, over expert-parallel ranks (no dropping).

With tensor parallelism every TP rank holds the same tokens; each TP rank dispatches only its
share of them and the per-slot expert outputs are gathered back, so each (token, expert) pair is
computed exactly once. Expert e lives on expert-parallel rank e // experts_per_rank.

`run(x, expert_ids, experts)` is four phases, which `DeepSeekMoE` calls as steps of its own (so
that DualPipe's overlapped step can run them one at a time):
  permute   take this TP rank's tokens, sort (token, slot) pairs by expert     (compute)
  dispatch  all-to-all counts, then tokens; regroup by local expert            (communication)
  (experts)
  combine   undo the regroup, all-to-all back                                   (communication)
  unpermute unsort, all-gather over TP -> [tokens, top_k, hidden]               (compute)
The host reads the step's data in one place, `read_counts`: the rows each rank sends to and
receives from each expert, which size the all-to-alls (and, handed on in `Exchange`, the experts'
GEMMs). Without expert parallelism nothing here reads a device value on the host (the experts'
GEMM sizes are then their business: see experts.py). A rehearsal (megatron_dsv3/rehearse) sets
`assumed_routing` and these counts come from its routing assumption instead: the one place a
rehearsal differs from a run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_dsv3.parallel import groups
from megatron_dsv3.parallel import comm
from megatron_dsv3.parallel.collectives import all_to_all, copy_to_group


def inverse(permutation: torch.Tensor) -> torch.Tensor:
    """The inverse permutation, so that undoing one is a gather: `index_select` keeps only its index
    for backward, where `index_copy` would keep the whole source alive (autograd saves it)."""
    return torch.empty_like(permutation).scatter_(0, permutation, torch.arange(permutation.numel(),
                                                                               device=permutation.device))


class _GatherTokens(torch.autograd.Function):
    """All-gather dim 0 over TP; backward keeps this rank's slice (downstream grads are replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        return torch.cat(comm.all_gather(x, group))

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


@dataclass
class Permutation:
    """Where permute put each (token, slot) pair: undone by `unpermute`."""

    order: torch.Tensor  # [pairs]: sorted position -> pair (token * top_k + slot)
    unorder: torch.Tensor  # [pairs]: pair -> sorted position (order's inverse)
    counts_E: torch.Tensor  # [experts] pairs per expert, on the device
    local_tokens: int
    top_k: int


@dataclass
class Exchange:
    """What dispatch sent where, for combine to send back: the all-to-all split sizes (host lists)
    and the regroup of received rows by local expert."""

    tokens_per_expert: torch.Tensor  # [local experts], the experts' segment sizes
    input_splits: Optional[list[int]] = None
    output_splits: Optional[list[int]] = None
    regroup: Optional[torch.Tensor] = None
    ungroup: Optional[torch.Tensor] = None  # regroup's inverse
    rows_per_expert: Optional[list[int]] = None  # tokens_per_expert on the host, where the host has it


class RoutingAssumption(Protocol):
    """Routing counts without routing: a rehearsal's stand-in for the router's choices."""

    def pair_counts(self, pairs: int, num_experts: int, local_experts: range) -> list[int]:
        """How many of one rank's `pairs` (token, slot) pairs go to each expert, every rank alike;
        `local_experts` are this rank's."""


class TokenDispatcher:
    def __init__(self, num_experts: int, ep_group: Optional[dist.ProcessGroup], tp_group: Optional[dist.ProcessGroup]):
        self.ep_group, self.tp_group = ep_group, tp_group
        self.ep_size, self.tp_size = groups.size(ep_group), groups.size(tp_group)
        self.num_experts = num_experts
        self.experts_per_rank = num_experts // self.ep_size
        self.assumed_routing: Optional[RoutingAssumption] = None  # set by a rehearsal only

    def run(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor,
            experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Unweighted expert outputs for every (token, slot): [tokens, top_k, hidden]."""
        x_sorted, permutation = self.permute(x_TH, expert_ids_TK)
        received, exchange = self.dispatch(x_sorted, permutation)
        out = experts(received, exchange.tokens_per_expert)
        return self.unpermute(self.combine(out, exchange), permutation)

    def permute(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor) -> tuple[torch.Tensor, Permutation]:
        """This TP rank's (token, slot) pairs' inputs sorted by expert [pairs, hidden]."""
        tokens, top_k = expert_ids_TK.shape
        if self.tp_size > 1:
            if tokens % self.tp_size:
                raise ValueError(f"batch*seq={tokens} tokens must divide by tensor_parallel_size={self.tp_size} for MoE")
            share = tokens // self.tp_size
            start = groups.rank(self.tp_group) * share
            # Each TP rank back-propagates only its share of tokens: sum the shares in backward.
            x_TH = copy_to_group(x_TH, self.tp_group)
            x_TH, expert_ids_TK = x_TH[start:start + share], expert_ids_TK[start:start + share]
        flat_experts = expert_ids_TK.flatten()  # pair p = token p // top_k, slot p % top_k
        order = torch.argsort(flat_experts, stable=True)
        # Not torch.bincount: on CUDA it reads the largest id on the host to size its output.
        counts_E = torch.zeros(self.num_experts, dtype=torch.long, device=flat_experts.device).index_add_(
            0, flat_experts, torch.ones_like(flat_experts))
        return x_TH.index_select(0, order // top_k), Permutation(order, inverse(order), counts_E, x_TH.shape[0], top_k)

    def dispatch(self, x_sorted: torch.Tensor, permutation: Permutation) -> tuple[torch.Tensor, Exchange]:
        """The rows of this rank's experts, grouped by local expert (identity without EP)."""
        if self.ep_size == 1:
            rows = None if self.assumed_routing is None else self._assumed_counts(x_sorted.shape[0])[1][0]
            return x_sorted, Exchange(permutation.counts_E, rows_per_expert=rows)
        return self.exchange(x_sorted, permutation.counts_E)

    def exchange(self, x_sorted: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, Exchange]:
        """`dispatch`'s all-to-alls (counts, then rows), on a group of any size."""
        send_counts = counts_E.view(self.ep_size, self.experts_per_rank)  # [dest rank, local expert]
        recv_counts = torch.empty_like(send_counts)
        comm.all_to_all_single(recv_counts, send_counts, group=self.ep_group)  # [source rank, local expert]
        sent, received_counts = self.read_counts(send_counts, recv_counts, x_sorted.shape[0])
        input_splits, output_splits = [sum(row) for row in sent], [sum(row) for row in received_counts]
        received = all_to_all(x_sorted, output_splits, input_splits, self.ep_group)
        # Received rows are ordered (source rank, local expert); the experts want (local expert, source rank).
        block_expert = torch.arange(self.experts_per_rank, device=x_sorted.device).repeat(self.ep_size)
        row_block = torch.repeat_interleave(torch.arange(block_expert.numel(), device=x_sorted.device),
                                            recv_counts.flatten(), output_size=sum(output_splits))
        regroup = torch.argsort(block_expert[row_block], stable=True)
        rows_per_expert = [sum(column) for column in zip(*received_counts)]
        return received.index_select(0, regroup), Exchange(recv_counts.sum(0), input_splits, output_splits, regroup,
                                                           inverse(regroup), rows_per_expert)

    def read_counts(self, send_counts: torch.Tensor, recv_counts: torch.Tensor,
                    pairs: int) -> tuple[list[list[int]], list[list[int]]]:
        """The host's one read of the step's data: the rows this rank sends to each (rank, local
        expert) and receives from each (rank, local expert), of its `pairs` sorted rows. A
        rehearsal answers from `assumed_routing`."""
        if self.assumed_routing is not None:
            return self._assumed_counts(pairs)
        sent, received = torch.stack([send_counts, recv_counts]).tolist()  # one device-to-host copy
        return sent, received

    def _assumed_counts(self, pairs: int) -> tuple[list[list[int]], list[list[int]]]:
        """`read_counts` under the routing assumption: every rank sends its pairs alike."""
        per_rank = self.experts_per_rank
        mine = range(groups.rank(self.ep_group) * per_rank, (groups.rank(self.ep_group) + 1) * per_rank)
        counts = self.assumed_routing.pair_counts(pairs, self.num_experts, mine)
        sent = [counts[r * per_rank:(r + 1) * per_rank] for r in range(self.ep_size)]
        return sent, [counts[mine.start:mine.stop] for _ in range(self.ep_size)]

    def combine(self, out: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        """Expert outputs back to the ranks their tokens came from, in `dispatch`'s input order."""
        if exchange.regroup is None:
            return out
        out = out.index_select(0, exchange.ungroup)
        return all_to_all(out, exchange.input_splits, exchange.output_splits, self.ep_group)

    def unpermute(self, out_sorted: torch.Tensor, permutation: Permutation) -> torch.Tensor:
        """[pairs sorted by expert, hidden] -> [tokens, top_k, hidden] (all tokens, under TP too)."""
        out_pairs = out_sorted.index_select(0, permutation.unorder)
        out_TKH = out_pairs.view(permutation.local_tokens, permutation.top_k, -1)
        if self.tp_size > 1:
            out_TKH = _GatherTokens.apply(out_TKH, self.tp_group)
        return out_TKH
