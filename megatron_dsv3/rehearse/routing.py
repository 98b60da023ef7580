"""Routing assumptions: the counts a rehearsal's dispatcher uses instead of the router's choices.

A meta tensor has no values, so the one host read of a step's data (the dispatcher's split sizes,
`TokenDispatcher.read_counts`) takes its counts from a named assumption:

    balanced      every expert gets the same number of (token, slot) pairs (the remainder of an
                  uneven split goes to this rank's experts first)
    maxvio=X      the load metric of the aux-loss-free paper, MaxVio = max load / mean load - 1:
                  one expert of this rank gets (1 + X) times the mean, the others share the rest
                  evenly. It is the worst case for this rank's memory at that MaxVio.

Every rank is assumed to send alike, so a rank receives, for each of its experts, that expert's
count from every rank of its expert-parallel group. `forced_routing` makes a real run's routers
choose experts with the same counts, so a real run and a rehearsal can be compared byte for byte.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from megatron_dsv3.model.moe.router import Router
from megatron_dsv3.parallel import groups


class RoutingError(ValueError):
    """A routing assumption that cannot be met; the message names it."""


@dataclass(frozen=True)
class Balanced:
    name: str = "balanced"

    def pair_counts(self, pairs: int, num_experts: int, local_experts: range) -> list[int]:
        return _spread(pairs, [e for e in range(num_experts) if e in local_experts]
                       + [e for e in range(num_experts) if e not in local_experts], num_experts)


@dataclass(frozen=True)
class MaxVio:
    """One expert of this rank at (1 + maxvio) x the mean load; `top_k`: each token picks an expert
    at most once, so no expert can take more than pairs / top_k."""

    maxvio: float
    top_k: int

    @property
    def name(self) -> str:
        return f"maxvio={self.maxvio:g}"

    def pair_counts(self, pairs: int, num_experts: int, local_experts: range) -> list[int]:
        hot = round((1 + self.maxvio) * pairs / num_experts)
        if hot > pairs // self.top_k:
            raise RoutingError(f"routing maxvio={self.maxvio:g} asks {hot} of {pairs} pairs for one expert, but a token "
                               f"picks an expert at most once: at most {pairs // self.top_k} "
                               f"(maxvio <= {num_experts / self.top_k - 1:g} with {num_experts} experts, top-{self.top_k})")
        hot_expert = local_experts.start
        others = [e for e in local_experts if e != hot_expert] + [e for e in range(num_experts)
                                                                   if e not in local_experts]
        counts = _spread(pairs - hot, others, num_experts)
        counts[hot_expert] = hot
        return counts


def _spread(pairs: int, order: list[int], num_experts: int) -> list[int]:
    """`pairs` spread evenly over the experts in `order`, the remainder to the first of them."""
    counts = [0] * num_experts
    share, extra = divmod(pairs, len(order))
    for i, expert in enumerate(order):
        counts[expert] = share + (i < extra)
    return counts


def parse_routing(text: str, top_k: int) -> Balanced | MaxVio:
    """`balanced` or `maxvio=X` (X >= 0)."""
    if text == "balanced":
        return Balanced()
    name, _, value = text.partition("=")
    try:
        maxvio = float(value)
    except ValueError:
        maxvio = -1.0
    if name != "maxvio" or not maxvio >= 0:
        raise RoutingError(f"--routing {text!r} is not 'balanced' or 'maxvio=X' with X >= 0 (e.g. maxvio=0.5)")
    return MaxVio(maxvio, top_k)


def assume_routing(model: nn.Module, assumption) -> None:
    """Every MoE layer of `model` takes its dispatch counts from `assumption` (a rehearsal)."""
    for module in model.modules():
        if hasattr(module, "dispatcher"):
            module.dispatcher.assumed_routing = assumption


def forced_expert_ids(counts: list[int], tokens: int, top_k: int, device: torch.device) -> torch.Tensor:
    """Expert ids [tokens, top_k] giving expert e exactly counts[e] pairs, no expert twice for one
    token: the experts in order fill slot 0 of every token, then slot 1, ... (each count <= tokens)."""
    ids = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device),
                                  output_size=tokens * top_k)
    return ids.view(top_k, tokens).t().contiguous()


@contextlib.contextmanager
def forced_routing(model: nn.Module, assumption) -> Iterator[None]:
    """A real run's routers choose experts with `assumption`'s counts (this rank's experts by its
    expert-parallel rank), for comparing it with a rehearsal. The gates still come from the scores."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    dispatchers = {id(m.router): m.dispatcher for m in model.modules() if hasattr(m, "dispatcher")}
    for router in routers:
        dispatcher = dispatchers[id(router)]

        def select(scores_TE: torch.Tensor, router=router, dispatcher=dispatcher) -> torch.Tensor:
            tokens, top_k = scores_TE.shape[0], router.config.num_experts_per_token
            per_rank = dispatcher.experts_per_rank
            first = per_rank * groups.rank(dispatcher.ep_group)
            counts = assumption.pair_counts(tokens * top_k, router.config.num_routed_experts,
                                            range(first, first + per_rank))
            return forced_expert_ids(counts, tokens, top_k, scores_TE.device)

        router.select = select
    try:
        yield
    finally:
        for router in routers:
            del router.select
