"""MTP metrics (report section 2.2) from the counts each MTP module keeps (`model/mtp.py`): the
loss per depth and how often the depth's top-1 prediction is the true token. For depth 1 that is
the token after next, and the rate is the acceptance of speculative decoding with the MTP head
(the report measures 85-90% for DeepSeek-V3, section 5.4.3)."""
from __future__ import annotations

import torch


def mtp_metrics(stats_D4: torch.Tensor, prefix: str = "mtp/") -> dict[str, float]:
    """``{prefix}loss_dK`` and ``{prefix}acceptance_dK`` per depth K, and ``{prefix}acceptance``
    (depth 1's), from rows of (loss sum, losses added, top-1 hits, targets), summed over the ranks
    and micro-batches since the last logging step (`model.mtp.take_stats`)."""
    out: dict[str, float] = {}
    for depth, (loss_sum, losses, hits, targets) in enumerate(stats_D4.detach().double().cpu().tolist(), start=1):
        if losses > 0:
            out[f"{prefix}loss_d{depth}"] = loss_sum / losses
        if targets > 0:
            out[f"{prefix}acceptance_d{depth}"] = hits / targets
    if f"{prefix}acceptance_d1" in out:
        out[f"{prefix}acceptance"] = out[f"{prefix}acceptance_d1"]
    return out
