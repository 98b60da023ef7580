"""Let Megatron-Core's own MLA + MoE layers (the local, non-Transformer-Engine spec) run without TE.

megatron-core 0.16 cannot build or run its DeepSeek-V3 layers from
`get_gpt_decoder_block_spec(config, use_transformer_engine=False)` on a machine without Transformer
Engine, for three reasons, each handled inside `local_spec_shims()` and undone on exit:

* `MLASelfAttention` builds its core attention with `k_channels=` (query/key head size,
  qk_head_dim + qk_pos_emb_head_dim) and `v_channels=` (v_head_dim), which TE's attention takes
  and the local `DotProductAttention` does not (TypeError). The local class then accepts both: its
  output width becomes heads x v_channels (it assumes kv_channels for both) and its default softmax
  scale uses k_channels (MLA passes its own scale anyway).
* `megatron.core.extensions.transformer_engine` imports without TE and names `TELinear` a
  MagicMock, so `multi_latent_attention.HAVE_TE` is True and `isinstance(self.linear_proj, TELinear)`
  raises TypeError: that module's `HAVE_TE` reads False while its `TELinear` is not a class.
* `moe_utils.RouterGatingLinearFunction` tests `te_general_gemm is not None`, a name only bound
  when TE imports (NameError): it is bound to None.

A release that does not have a problem is left alone there.

    with local_spec_shims():
        model = GPTModel(config, get_gpt_decoder_block_spec(config, use_transformer_engine=False), ...)
        logits = model(tokens, position_ids, None)
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Iterator, Optional

from megatron_dsv3.compat.active import mark, unmark

NAME = "megatron.core.transformer:local-mla-moe-without-te"
_UNSET = object()


@contextlib.contextmanager
def local_spec_shims() -> Iterator[None]:
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.moe import moe_utils

    original_init = DotProductAttention.__init__
    have_te = mla.HAVE_TE
    gemm = vars(moe_utils).get("te_general_gemm", _UNSET)
    needs_channels = "k_channels" not in inspect.signature(original_init).parameters
    fake_te = have_te and not isinstance(getattr(mla, "TELinear", None), type)
    if not (needs_channels or fake_te or gemm is _UNSET):
        yield
        return

    def __init__(self, config, *args, k_channels: Optional[int] = None, v_channels: Optional[int] = None,
                 **kwargs) -> None:
        original_init(self, config, *args, **kwargs)
        heads_per_partition = self.hidden_size_per_partition // self.hidden_size_per_attention_head
        if v_channels is not None:
            self.hidden_size_per_partition = heads_per_partition * v_channels
        if k_channels is not None:
            if kwargs.get("softmax_scale") is None:
                self.softmax_scale *= math.sqrt(self.hidden_size_per_attention_head / k_channels)
            self.hidden_size_per_attention_head = k_channels

    if needs_channels:
        DotProductAttention.__init__ = __init__
    mla.HAVE_TE = have_te and not fake_te
    if gemm is _UNSET:
        moe_utils.te_general_gemm = None
    mark(NAME)
    try:
        yield
    finally:
        DotProductAttention.__init__ = original_init
        mla.HAVE_TE = have_te
        if gemm is _UNSET:
            del moe_utils.te_general_gemm
        unmark(NAME)
