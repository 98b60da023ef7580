"""megatron_dsv3: DeepSeek-V3's training recipe as a Megatron-Core plugin.

    from megatron_dsv3 import DSV3Config, build_model
    model = build_model(DSV3Config.preset("tiny"))
    logits = model(tokens)                    # [batch, seq, vocab]
    out = model(tokens, labels=labels)        # out.loss = LM + MTP + balance
"""
from megatron_dsv3.config import ConfigError, DSV3Config, YarnConfig  # noqa: F401
from megatron_dsv3.model.gpt import DSV3Model, LMOutput, build_model  # noqa: F401
from megatron_dsv3.registry import get, names, register  # noqa: F401

# Modules that register built-in entries (presets, layer specs, schedules) when imported.
from megatron_dsv3 import mcore, pipeline  # noqa: F401, E402

__version__ = "0.1.0"
