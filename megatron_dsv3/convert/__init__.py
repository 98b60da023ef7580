"""dsv3-convert: weights from Hugging Face (BF16 or FP8) into the distributed checkpoints dsv3-train
starts from, and back (`cli/convert.py` is the command line).

    hf.py               Hugging Face names, FP8 dequantisation, in-memory import/export of a whole model
    hf_to_dist.py       Hugging Face safetensors -> layout-free distributed checkpoint, streamed
    dist_to_hf.py       distributed checkpoint -> Hugging Face shards (optionally FP8 + weight_scale_inv)
    distcp.py           the torch_dist checkpoint format, written and read one chunk at a time
    safetensors_io.py   safetensors shards, read and written one tensor at a time
    mcore.py            native Megatron-Core checkpoints <-> ours (`mcore_names.py`: the name maps)
"""
from megatron_dsv3.convert.dist_to_hf import dist_to_hf
from megatron_dsv3.convert.distcp import DistCheckpointError, DistReader, DistWriter
from megatron_dsv3.convert.hf_to_dist import check_layout, hf_to_dist, read_hf_config

__all__ = ["DistCheckpointError", "DistReader", "DistWriter", "check_layout", "dist_to_hf", "hf_to_dist",
           "read_hf_config"]
