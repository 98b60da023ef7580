"""DeepSeek-V3 inside Megatron-Core's own TransformerLayer / TransformerBlock / GPTModel.

An organisation on Megatron-Core keeps its model code and swaps ModuleSpecs:

    config = megatron_config_from_dsv3(DSV3Config.preset("deepseek-v3-671b"))  # or their own MLATransformerConfig
    model = GPTModel(config, transformer_layer_spec=get_dsv3_decoder_block_spec(config),
                     mtp_block_spec=get_dsv3_mtp_block_spec(config),
                     vocab_size=129280, max_sequence_length=4096, position_embedding_type="rope")

    config.py     DSV3Config <-> Megatron's MLATransformerConfig, and what the adapters refuse
    layers.py     adapters: Megatron's call conventions around this project's MLA, DeepSeekMoE, SwiGLU
    specs.py      the layer, decoder-block and MTP-block specs; Megatron-LM's `--spec` objects

Weights move between `DSV3Model` and such a GPTModel with a prefix rename
(`megatron_dsv3.convert.mcore_names`); tests/test_mcore_spec.py checks both give the same logits.
"""
from megatron_dsv3.mcore.config import (GroupScoreWarning, check_supported, dsv3_config_from_megatron,  # noqa: F401
                                        megatron_config_from_dsv3)
from megatron_dsv3.mcore.specs import (get_dsv3_decoder_block_spec, get_dsv3_layer_spec,  # noqa: F401
                                       get_dsv3_mtp_block_spec)
