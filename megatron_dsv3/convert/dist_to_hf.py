"""A distributed checkpoint (dsv3-train's or hf-to-dist's) -> Hugging Face DeepseekV3 safetensors.

    dsv3-convert dist-to-hf runs/x/checkpoints/iter_0001000 /export/dsv3 [--fp8] [--dtype bf16] [--tokenizer T]

Names are DeepSeek's published ones (per-expert `mlp.experts.{e}.*_proj.weight`, MTP module k at
layer num_layers + k with copies of the main embedding and head), which transformers'
`from_pretrained` reads. `--fp8` stores the decoder layers' projection weights (attention,
dense FFN, shared and routed experts; not the router, the embedding, the head, norms or the MTP
`eh_proj`, as DeepSeek's release) as float8_e4m3fn with a `weight_scale_inv` per 128x128 block
(`fp8.quantize_blocks`, the training quantiser) and writes the `quantization_config` transformers
reads. The routing bias `e_score_correction_bias` is FP32 whatever `--dtype` (`hf.stored_dtype`).
config.json carries DeepSeek-V3's release fields (`DSV3Config.to_hf_dict`) and the run's
tokenizer ids; the run's tokenizer files are copied beside the weights, or README.md says why not
(`tokenizer_files.py`). The shard layout is planned from the checkpoint's metadata, then each
shard is written one tensor at a time: memory holds one tensor plus the checkpoint chunk it comes from.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from megatron_dsv3.convert import hf, output
from megatron_dsv3.config import HF_FP8_QUANTIZATION, DSV3Config
from megatron_dsv3.convert.distcp import DistCheckpointError, DistReader
from megatron_dsv3.convert.hf_to_dist import meta_model
from megatron_dsv3.convert.safetensors_io import ShardWriter
from megatron_dsv3.convert.tokenizer_files import RunTokenizer, run_tokenizer, write_tokenizer
from megatron_dsv3.fp8.quantize import TILE as FP8_BLOCK, quantize_blocks

FP8_WEIGHTS = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(.+\.)?\w*proj\w*\.weight$")
QUANTIZATION_CONFIG = HF_FP8_QUANTIZATION
PARTIAL_BLOCKS_CAVEAT = (
    "transformers 5.x dequantises a weight whose rows or columns are not a multiple of 128 in the wrong blocks "
    "(or refuses it): load this folder inside megatron_dsv3.compat.transformers_fp8.fp8_partial_blocks(), or export "
    "without --fp8 for transformers; DeepSeek's reference code, vLLM and SGLang read partial edge blocks right")


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
                                   fp8 and bool(FP8_WEIGHTS.match(name)), hf.stored_dtype(name, dtype)))
        else:
            items.append(_Item(slot.fused, tuple(slot.target.shape), whole(key),
                               fp8 and bool(FP8_WEIGHTS.match(slot.fused)), hf.stored_dtype(slot.fused, dtype)))
    for copy, key in hf._mtp_copies(model).items():
        items.append(_Item(copy, tuple(slots[key].target.shape), whole(key), False, dtype))
    return items


def dist_to_hf(checkpoint: Union[str, os.PathLike], out: Union[str, os.PathLike], fp8: bool = False,
               dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 4 * 2**30,
               log=lambda message: None, replace: bool = False, tokenizer: Optional[str] = None) -> list[Path]:
    """Write shards + model.safetensors.index.json + config.json + the run's tokenizer files + README.md
    into `out` (through `out.tmp`, see convert/output.py: a folder holding files is refused unless
    `replace`); returns the shard paths. `tokenizer` ("byte" or a tokenizer.json) replaces the
    run_config.yaml's `data.tokenizer`; what became of the tokenizer is logged."""
    reader = DistReader(checkpoint)
    if "model_config" not in reader.common:
        raise DistCheckpointError(f"{reader.path / 'common.pt'} holds no model_config: not a dsv3 checkpoint")
    config = DSV3Config.from_dict(reader.common["model_config"])
    items = _items(reader, config, fp8, dtype)
    found = run_tokenizer(checkpoint, tokenizer)
    partial = [item for item in items if item.fp8 and any(n % FP8_BLOCK for n in item.shape[-2:])]

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
        names = _write_shards(tmp, shards, config, fp8, dtype, found, log)
        reader.verified()
        written = write_tokenizer(found, tmp, config.max_position_embeddings)
        caveat = f"{len(partial)} FP8 weights (e.g. {partial[0].name} {list(partial[0].shape)}) end in partial " \
                 f"128x128 blocks: {PARTIAL_BLOCKS_CAVEAT}" if partial else None
        _write_readme(tmp, reader, fp8, dtype, found, written, caveat)
    output.finish(tmp, out)
    log(found.note)
    if caveat:
        log(caveat)
    return [out / name for name in names]


def _write_readme(folder: Path, reader: DistReader, fp8: bool, dtype: torch.dtype, found: RunTokenizer,
                  written: list[str], caveat: Optional[str]) -> None:
    weights = f"{str(dtype).removeprefix('torch.')}" + (
        ", the decoder layers' projection weights in FP8 (float8_e4m3fn) with a weight_scale_inv per 128x128 block"
        if fp8 else "")
    lines = ["# DeepSeek-V3 weights exported by dsv3-convert", "",
             f"- from: `{reader.path}` (step {reader.common.get('step', '?')})",
             f"- weights: {weights}; the routing bias (e_score_correction_bias) in float32",
             "- names and config.json: DeepSeek-V3's published ones (MTP modules at layer num_hidden_layers + k)",
             f"- {found.note}" + (f" ({', '.join(written)})" if written else "")]
    if caveat:
        lines.append(f"- FP8 and transformers: {caveat}")
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _write_shards(folder: Path, shards: list[list[_Item]], config: DSV3Config, fp8: bool, dtype: torch.dtype,
                  found: RunTokenizer, log) -> list[str]:
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
    hf.write_hf_config(folder, config, dtype, found.token_ids, fp8,
                       {"dsv3_tokenizer": "byte"} if found.is_byte else None)
    return names
