"""Hugging Face DeepseekV3 safetensors -> a distributed checkpoint `dsv3-train` starts from.

    dsv3-convert hf-to-dist /data/DeepSeek-V3 /ckpt/dsv3-base [--dtype fp32] [--tensor 8 --expert 64 --pipeline 16]
    dsv3-train ... checkpoint.load_weights=/ckpt/dsv3-base

1. `config.json` -> DSV3Config (`DSV3Config.from_hf`); the model is built on the `meta` device,
   which gives every tensor's name and global shape and allocates nothing.
2. The shards' headers give every Hugging Face name, shape and dtype; `hf.place_weights` checks them
   against the model (missing, unexpected and mis-shaped tensors and FP8 scale grids are refused
   by name) before a byte of weights is read. A target layout, when given, is checked the same
   way (`DSV3Config.validate`), not baked in: the checkpoint is layout-free.
3. The shards are read front to back, one tensor at a time: FP8 weights are dequantised with
   their `weight_scale_inv` (128x128 blocks, partial at the edges), cast to `--dtype`, and
   written as a chunk of our tensor (per-expert weights as the expert's slice of the fused
   expert tensor); the routing bias stays FP32 whatever `--dtype` (`hf.stored_dtype`). MTP
   module k is Hugging Face layer num_hidden_layers + k; its embedding and head copies are
   compared with the main ones (the MTP module shares those, report 2.2).

Peak memory is a tensor or two (the MTP copy check holds the copy and the main tensor), not the
model and not a shard (BENCHMARKS.md).
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_dsv3 import safe_data
from megatron_dsv3.convert import hf
from megatron_dsv3.config import ConfigError, DSV3Config
from megatron_dsv3.convert.distcp import DistWriter
from megatron_dsv3.convert.safetensors_io import read_headers, read_tensor
from megatron_dsv3.model.gpt import build_model


@dataclass
class Converted:
    path: Path
    config: DSV3Config
    tensors: int = 0  # Hugging Face tensors read (scales not counted)
    dequantized: list[str] = field(default_factory=list)
    mtp_copies_checked: list[str] = field(default_factory=list)


MAX_JSON_BYTES = 64 * 2**20  # a config.json is a few KB, an index of 671B's shards about 10 MB


def read_json(path: Union[str, os.PathLike], what: str) -> dict:
    """A JSON object from a file of at most MAX_JSON_BYTES; ConfigError names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing")
    return safe_data.read_json(path, f"{what} {path}", MAX_JSON_BYTES, ConfigError)


def config_from_json(values: dict, path: Union[str, os.PathLike]) -> DSV3Config:
    """DSV3Config from the fields of a Hugging Face config.json (RoPE in transformers 5's
    `rope_parameters`, DeepSeek's `rope_theta` + `rope_scaling`, or both); ConfigError names a missing
    or malformed field."""
    try:
        return DSV3Config.from_hf(types.SimpleNamespace(**values))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path} is not a DeepseekV3 config.json ({type(error).__name__}: {error})") from None


def read_hf_config(directory: Union[str, os.PathLike]) -> DSV3Config:
    """DSV3Config from a checkpoint folder's config.json (transformers or DeepSeek's own)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the model's shape comes from it")
    return config_from_json(read_json(path, "config.json"), path)


def meta_model(config: DSV3Config) -> torch.nn.Module:
    """The unsharded model with no storage: names and global shapes only."""
    with torch.device("meta"):
        return build_model(config)


def check_layout(config: DSV3Config, tensor: int = 1, pipeline: int = 1, expert: int = 1) -> None:
    """Refuse (ConfigError naming the field) a layout the model does not split into."""
    config.validate(tensor_parallel_size=tensor, expert_parallel_size=expert, pipeline_parallel_size=pipeline)


def _offsets(slot: hf._Slot, part: Optional[tuple[int, slice]]) -> tuple[list[int], bool]:
    """Where a Hugging Face tensor goes in our tensor: its offsets, and whether it needs the expert dim."""
    if part is None:
        return [0] * slot.target.dim(), False
    expert, rows = part
    return [expert, rows.start or 0, *[0] * (slot.target.dim() - 2)], True


def hf_to_dist(hf_dir: Union[str, os.PathLike], out: Union[str, os.PathLike], dtype: torch.dtype = torch.float32,
               layout: Optional[dict[str, int]] = None, max_file_bytes: int = 4 * 2**30,
               log=lambda message: None, replace: bool = False) -> Converted:
    """Convert; returns what was done. `layout` ({"tensor", "pipeline", "expert"}) is only checked."""
    hf_dir = Path(hf_dir)
    config = read_hf_config(hf_dir)
    check_layout(config, **(layout or {}))
    model = meta_model(config)
    entries = read_headers(hf_dir)
    placement = hf.place_weights(model, {n: e.shape for n, e in entries.items()},
                                 {n for n, e in entries.items() if e.dtype == torch.float8_e4m3fn}, strict=True)
    log(f"{len(entries)} tensors in {len({e.path for e in entries.values()})} shards match the model "
        f"({config.num_layers} layers, {config.num_routed_experts} routed experts, MTP {config.mtp_num_modules})")

    done = Converted(Path(out), config)
    writer = DistWriter(out, max_file_bytes, replace=replace)
    try:
        for key, slot in placement.slots.items():
            writer.declare(f"model.{key}", slot.target.shape, hf.stored_dtype(slot.fused, dtype))
        order = sorted(placement.targets, key=lambda n: (str(entries[n].path), entries[n].begin))
        for number, name in enumerate(order, 1):
            slot, part = placement.targets[name]
            offsets, unsqueeze = _offsets(slot, part)
            tensor = _read(entries, placement, name, done)
            writer.write(f"model.{slot.key}", offsets, tensor.unsqueeze(0) if unsqueeze else tensor)
            del tensor
            if number % 500 == 0:
                log(f"{number}/{len(order)} tensors written")
        for name, key in placement.copies.items():
            main_name = hf.hf_name(key, config.num_layers)
            hf.check_mtp_copy(name, _read(entries, placement, name, done), _read(entries, placement, main_name, done),
                              main_name)
            done.mtp_copies_checked.append(name)
        done.tensors = len(order)
        writer.close({"step": 0, "optimizer_steps": 0, "consumed_samples": 0, "model_config": config.to_dict(),
                      "converted_from": str(hf_dir.resolve())})
    except BaseException:
        writer.abort()
        raise
    return done


def _read(entries, placement: hf.WeightPlacement, name: str, done: Converted) -> torch.Tensor:
    tensor = read_tensor(entries[name])
    if name in placement.scales:
        tensor = hf.dequantize_fp8_blockwise(tensor, read_tensor(entries[placement.scales[name]]))
        done.dequantized.append(name)
    return tensor
