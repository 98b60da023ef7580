"""Fine-grained routed experts whose cost follows the routed tokens (report section 2.1.2).

Tokens arrive sorted by local expert (the dispatcher's one permutation per layer), so expert e's
tokens are one contiguous segment of the input. Each expert's SwiGLU runs on its own segment:
no token is dropped, and no expert is padded to the most loaded one's count, so a skewed routing
costs the FLOPs and activations of its tokens, not of E x the largest segment.

- `SegmentMatmul` (the default): on a CUDA device in BF16, torch's grouped matmul over the
  segments (found by feature: `F.grouped_mm` or `torch._grouped_mm`), with the segment ends
  computed on the device, so no host sync; otherwise one GEMM per segment written in place (on
  CPU torch's grouped matmul is no faster and its FP32 backward refuses stride-0 gradients).
  Both are autograd functions whose weight gradients DualPipe's W can defer (`weight_grad_store.py`).
- A matmul with `grouped(x, w, rows_per_expert)` and a `row_multiple` (the FP8 one) gets each
  expert's rows zero-padded to that multiple (128, the kernel's tile), never to the largest count.
- Any other `x [E, C, K] @ w [E, N, K]^T` callable runs once per segment.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_dsv3.model.common import recomputed
from megatron_dsv3.weight_grad_store import weight_grad

BatchedMatmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _grouped_mm_op() -> Optional[Callable]:
    """torch's grouped matmul if this torch has one (public name first), else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class _SegmentMatmulFn(torch.autograd.Function):
    """y[s_e:s_{e+1}] = x[s_e:s_{e+1}] @ w[e]^T for each expert's segment; every GEMM writes in place."""

    @staticmethod
    def forward(ctx, x_MK, w_ENK, counts_E: list[int]):
        ctx.save_for_backward(x_MK, w_ENK)
        ctx.counts = counts_E
        y_MN = x_MK.new_empty(x_MK.shape[0], w_ENK.shape[1])
        for x_e, y_e, w_e in zip(x_MK.split(counts_E), y_MN.split(counts_E), w_ENK):
            torch.mm(x_e, w_e.t(), out=y_e)
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, w_ENK = ctx.saved_tensors
        dx_MK = None
        if ctx.needs_input_grad[0]:
            dx_MK = torch.empty_like(x_MK)
            for dy_e, dx_e, w_e in zip(dy_MN.split(ctx.counts), dx_MK.split(ctx.counts), w_ENK):
                torch.mm(dy_e, w_e, out=dx_e)
        counts_E, shape_ENK = ctx.counts, w_ENK.shape
        dw_ENK = weight_grad(ctx, 1, lambda: _segment_weight_grad(x_MK, dy_MN, counts_E, shape_ENK), x_MK, dy_MN)
        return dx_MK, dw_ENK, None


def _segment_weight_grad(x_MK: torch.Tensor, dy_MN: torch.Tensor, counts_E: list[int],
                         shape_ENK: torch.Size) -> torch.Tensor:
    """dw[e] = dy[s_e:s_{e+1}]^T x[s_e:s_{e+1}] for each expert; an empty segment writes zeros."""
    dw_ENK = x_MK.new_empty(shape_ENK)
    for x_e, dy_e, dw_e in zip(x_MK.split(counts_E), dy_MN.split(counts_E), dw_ENK):
        torch.mm(dy_e.t(), x_e, out=dw_e)
    return dw_ENK


class _GroupedMatmulFn(torch.autograd.Function):
    """torch's grouped matmul over the segments ending at `ends_E`, with the products autograd
    forms for it (the same calls, so the same bits); its weight gradient through `weight_grad`."""

    @staticmethod
    def forward(ctx, x_MK, w_ENK, ends_E):
        ctx.save_for_backward(x_MK, w_ENK, ends_E)
        return _grouped_mm_op()(x_MK, w_ENK.transpose(1, 2), offs=ends_E)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, w_ENK, ends_E = ctx.saved_tensors
        dx_MK = _grouped_mm_op()(dy_MN, w_ENK, offs=ends_E) if ctx.needs_input_grad[0] else None
        dw_ENK = weight_grad(ctx, 1, lambda: _grouped_mm_op()(dy_MN.t(), x_MK, offs=ends_E), x_MK, dy_MN)
        return dx_MK, dw_ENK, None


class SegmentMatmul:
    """x @ w^T per expert over x [tokens sorted by expert, K], w [E, N, K], counts [E] -> [tokens, N]."""

    @staticmethod
    def uses_grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor) -> bool:
        """torch's grouped GEMM takes BF16 on CUDA, rows 16-byte aligned (K and N multiples of 8)."""
        return (x_MK.is_cuda and x_MK.dtype == torch.bfloat16 and _grouped_mm_op() is not None
                and x_MK.shape[1] % 8 == 0 and w_ENK.shape[1] % 8 == 0)

    def segments(self, x_MK: torch.Tensor, w_ENK: torch.Tensor, counts_E: torch.Tensor,
                 rows_E: Optional[list[int]] = None) -> torch.Tensor:
        """`rows_E`: counts_E on the host when the caller has it (the dispatcher read it), else read here."""
        dtype = torch.get_autocast_dtype(x_MK.device.type) if torch.is_autocast_enabled(x_MK.device.type) else x_MK.dtype
        x_MK, w_ENK = x_MK.to(dtype), w_ENK.to(dtype)  # autocast's cast for mm, done here for both paths
        if self.uses_grouped_mm(x_MK, w_ENK):
            ends_E = torch.cumsum(counts_E, 0, dtype=torch.int32)  # on the device: no host sync
            return _GroupedMatmulFn.apply(x_MK, w_ENK, ends_E)
        with torch.autocast(x_MK.device.type, enabled=False):
            rows_E = counts_E.tolist() if rows_E is None else rows_E  # the GEMM sizes: one sync per call
            return _SegmentMatmulFn.apply(x_MK, w_ENK, rows_E)


bf16_batched_matmul = SegmentMatmul()  # the default, FP32 and BF16 alike (the name layer.py imports)


class RoutedExperts(nn.Module):
    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int,
                 batched_matmul: BatchedMatmul | SegmentMatmul = bf16_batched_matmul):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.batched_matmul = batched_matmul
        # Layouts match Hugging Face's fused experts: gate rows first, then up rows.
        self.gate_up_weight = nn.Parameter(torch.empty(num_local_experts, 2 * ffn_hidden_size, hidden_size))
        self.down_weight = nn.Parameter(torch.empty(num_local_experts, hidden_size, ffn_hidden_size))
        self.gate_up_weight.expert_parallel = True
        self.down_weight.expert_parallel = True
        self.selective_recompute = False  # keep the SwiGLU inputs, recompute its output in backward

    def forward(self, x_NH: torch.Tensor, tokens_per_expert: torch.Tensor,
                rows_per_expert: Optional[list[int]] = None) -> torch.Tensor:
        """x [tokens sorted by local expert, hidden], counts [local experts] -> [tokens, hidden].
        `rows_per_expert`: the counts on the host, when the dispatcher has read them."""
        if x_NH.shape[0] == 0:  # keep every parameter in the graph so gradients stay defined
            return x_NH + 0 * (self.gate_up_weight.sum() + self.down_weight.sum())
        if hasattr(self.batched_matmul, "grouped"):
            return self._forward_padded_to_tile(x_NH, tokens_per_expert, rows_per_expert)
        if hasattr(self.batched_matmul, "segments"):
            matmul = self.batched_matmul.segments
        else:
            matmul = self._segment_by_segment
        gate, up = matmul(x_NH, self.gate_up_weight, tokens_per_expert, rows_per_expert).chunk(2, dim=-1)
        return recomputed(self.selective_recompute,
                          lambda g, u: matmul(F.silu(g) * u, self.down_weight, tokens_per_expert, rows_per_expert),
                          gate, up)

    def _segment_by_segment(self, x_MK: torch.Tensor, w_ENK: torch.Tensor, counts_E: torch.Tensor,
                            rows_E: Optional[list[int]] = None) -> torch.Tensor:
        """A plain batched callable, called once per expert on its segment ([1, rows, K])."""
        rows_E = counts_E.tolist() if rows_E is None else rows_E
        return torch.cat([self.batched_matmul(x_e[None], w_e[None])[0]
                          for x_e, w_e in zip(x_MK.split(rows_E), w_ENK.unbind(0))])

    def _forward_padded_to_tile(self, x_NH: torch.Tensor, tokens_per_expert: torch.Tensor,
                                rows_per_expert: Optional[list[int]] = None) -> torch.Tensor:
        """Each expert's rows zero-padded to a multiple of `row_multiple`, one GEMM per expert."""
        multiple = self.batched_matmul.row_multiple
        # the GEMM sizes: one host sync per layer, unless the dispatcher read them
        counts_E = tokens_per_expert.tolist() if rows_per_expert is None else rows_per_expert
        padded_E = [-(-n // multiple) * multiple for n in counts_E]
        padded_counts = torch.tensor(padded_E, device=x_NH.device)
        expert_of_token = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=x_NH.device), tokens_per_expert, output_size=x_NH.shape[0])
        first_of_expert = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        first_padded_row = torch.cumsum(padded_counts, 0) - padded_counts
        row = first_padded_row[expert_of_token] + (torch.arange(x_NH.shape[0], device=x_NH.device)
                                                   - first_of_expert[expert_of_token])
        # the padded rows gathered from x and one zero row: index_copy would keep x alive for backward
        source = torch.full((sum(padded_E),), x_NH.shape[0], device=x_NH.device).index_copy(0, row, torch.arange(
            x_NH.shape[0], device=x_NH.device))
        padded_MH = torch.cat([x_NH, x_NH.new_zeros(1, x_NH.shape[1])]).index_select(0, source)
        gate, up = self.batched_matmul.grouped(padded_MH, self.gate_up_weight, padded_E,
                                               label="routed experts gate_up").chunk(2, dim=-1)
        out_MH = recomputed(self.selective_recompute,
                            lambda g, u: self.batched_matmul.grouped(F.silu(g) * u, self.down_weight, padded_E,
                                                                     label="routed experts down"), gate, up)
        return out_MH.index_select(0, row)
