"""Megatron-Core 0.18's MTP layer under full activation recompute.

`MultiTokenPredictionLayer.forward` (megatron-core 0.18.2) passes `padding_mask=` to its own
`_checkpointed_forward`, which does not take it: every model with MTP layers fails with
`TypeError: ... _checkpointed_forward() got an unexpected keyword argument 'padding_mask'` under
`--recompute-granularity full`. Inside `mtp_recompute_padding_mask()` the method takes the
keyword; a padding mask of None (pretraining batches have none) is what the inner forward
defaults to anyway, and any other value is refused rather than dropped. A release whose method
takes the keyword is left alone.

    with mtp_recompute_padding_mask():
        pretrain(...)
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator

from megatron_dsv3.compat.active import mark, unmark

NAME = "megatron.core.transformer.multi_token_prediction:MultiTokenPredictionLayer._checkpointed_forward(padding_mask)"


@contextlib.contextmanager
def mtp_recompute_padding_mask() -> Iterator[None]:
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer

    original = getattr(MultiTokenPredictionLayer, "_checkpointed_forward", None)
    if original is None or "padding_mask" in inspect.signature(original).parameters:
        yield
        return

    @functools.wraps(original)
    def checkpointed_forward(self, *args: Any, padding_mask: Any = None, **kwargs: Any) -> Any:
        if padding_mask is not None:
            raise NotImplementedError("this megatron-core's MTP layer cannot recompute with a padding mask "
                                      "(MultiTokenPredictionLayer._checkpointed_forward takes none)")
        return original(self, *args, **kwargs)

    MultiTokenPredictionLayer._checkpointed_forward = checkpointed_forward
    mark(NAME)
    try:
        yield
    finally:
        MultiTokenPredictionLayer._checkpointed_forward = original
        unmark(NAME)
