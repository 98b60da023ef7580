"""A distributed checkpoint (dsv3-train's or hf-to-dist's) -> Hugging Face DeepseekV3 safetensors.

    dsv3-convert dist-to-hf runs/x/checkpoints/iter_0001000 /export/dsv3 [--fp8] [--dtype bf16]

Names are DeepSeek's published ones (per-expert `mlp.experts.{e}.*_proj.weight`, MTP module k at
layer num_layers + k with copies of the main embedding and head), which transformers'
`from_pretrained` reads. `--fp8` stores the decoder layers' projection weights (attention,
dense FFN, shared and routed experts; not the router, the embedding, the head, norms or the MTP
`eh_proj`, as DeepSeek's release) as float8_e4m3fn with a `weight_scale_inv` per 128x128 block
(`fp8.quantize_blocks`, the training quantiser) and writes the `quantization_config` transformers
reads. The shard layout is planned from the checkpoint's metadata, then each shard is written
one tensor at a time: memory holds one tensor plus the checkpoint chunk it comes from.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Union

import torch

from megatron_dsv3.convert import hf, output
from megatron_dsv3.config import DSV3Config
from megatron_dsv3.convert.distcp import DistCheckpointError, DistReader
from megatron_dsv3.convert.hf_to_dist import meta_model
from megatron_dsv3.convert.safetensors_io import ShardWriter
from megatron_dsv3.fp8.quantize import TILE as FP8_BLOCK, quantize_blocks

FP8_WEIGHTS = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(.+\.)?\w*proj\w*\.weight$")
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


class _Item:
    """One Hugging Face tensor (and its scale under FP8): names, dtypes, shapes and how to read it."""

    def __init__(self, name: str, shape: tuple[int, ...], read: Callable[[], torch.Tensor], fp8: bool,
                 dtype: torch.dtype):
        self.name, self.shape, self.read, self.fp8, self.dtype = name, shape, read, fp8, dtype

    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        if not self.fp8:
            return [(self.name, self.dtype, self.shape)]
        grid = (*self.shape[:-2], *(math.ceil(n / FP8_BLOCK) for n in self.shape[-2:]))
        return [(self.name, torch.float8_e4m3fn, self.shape), (self.name + "_scale_inv", torch.float32, grid)]

    def tensors(self) -> list[torch.Tensor]:
        value = self.read()
        if not self.fp8:
            return [value.to(self.dtype)]
        q, scale = quantize_blocks(value, name=self.name)
        return [q, scale.float()]

    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.layout())


def _items(reader: DistReader, config: DSV3Config, fp8: bool, dtype: torch.dtype) -> list[_Item]:
    model = meta_model(config)
    slots = hf._slots(model)
    missing = [f"model.{key}" for key in slots if f"model.{key}" not in reader.tensors]
    if missing:
        raise DistCheckpointError(f"{reader.path} lacks {len(missing)} tensor(s) of its own model config: "
                                  + ", ".join(missing[:10]))
    for key, slot in slots.items():
        if reader.shape(f"model.{key}") != tuple(slot.target.shape):
            raise DistCheckpointError(f"model.{key}: checkpoint {reader.shape(f'model.{key}')}, the model config "
                                      f"gives {tuple(slot.target.shape)}")

    def whole(key: str) -> Callable[[], torch.Tensor]:
        return lambda: reader.read(f"model.{key}")

    def expert_part(key: str, expert: int, rows: slice, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
        start = rows.start or 0
        return lambda: reader.read(f"model.{key}", [expert, start, 0], [1, *shape]).squeeze(0)

    items = []
    for key, slot in slots.items():
        if slot.parts:
            for name, (expert, rows) in slot.parts.items():
                shape = tuple(slot.view((expert, rows)).shape)
                items.append(_Item(name, shape, expert_part(key, expert, rows, shape),
                                   fp8 and bool(FP8_WEIGHTS.match(name)), dtype))
        else:
            items.append(_Item(slot.fused, tuple(slot.target.shape), whole(key),
                               fp8 and bool(FP8_WEIGHTS.match(slot.fused)), dtype))
    for copy, key in hf._mtp_copies(model).items():
        items.append(_Item(copy, tuple(slots[key].target.shape), whole(key), False, dtype))
    return items


def dist_to_hf(checkpoint: Union[str, os.PathLike], out: Union[str, os.PathLike], fp8: bool = False,
               dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 4 * 2**30,
               log=lambda message: None, replace: bool = False) -> list[Path]:
    """Write shards + model.safetensors.index.json + config.json into `out` (through `out.tmp`, see
    convert/output.py: a folder holding files is refused unless `replace`); returns the shard paths."""
    reader = DistReader(checkpoint)
    if "model_config" not in reader.common:
        raise DistCheckpointError(f"{reader.path / 'common.pt'} holds no model_config: not a dsv3 checkpoint")
    config = DSV3Config.from_dict(reader.common["model_config"])
    items = _items(reader, config, fp8, dtype)

    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes() > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes()

    out = Path(out)
    tmp = output.begin(out, replace)
    with output.writing(out, tmp):
        names = _write_shards(tmp, shards, config, fp8, log)
        reader.verified()
    output.finish(tmp, out)
    return [out / name for name in names]


def _write_shards(folder: Path, shards: list[list[_Item]], config: DSV3Config, fp8: bool, log) -> list[str]:
    names, weight_map, total = [], {}, 0
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(folder / name, [entry for item in shard for entry in item.layout()])
        for item in shard:
            for (tensor_name, _, _), tensor in zip(item.layout(), item.tensors()):
                writer.write(tensor_name, tensor)
                weight_map[tensor_name] = name
        writer.close()
        names.append(name)
        total += sum(item.nbytes() for item in shard)
        log(f"wrote {name} ({len(shard)} tensors)")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config = config.to_hf()
    if fp8:
        hf_config.quantization_config = dict(QUANTIZATION_CONFIG)
    hf_config.save_pretrained(str(folder))
    return names
