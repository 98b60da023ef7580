"""Native Megatron-Core DeepSeek-V3 distributed checkpoints <-> ours.

    dsv3-convert mcore-to-dist NATIVE_CKPT OUT --model-config config.json
    dsv3-convert dist-to-mcore CKPT OUT [--te]

A native checkpoint is what `dist_checkpointing.save(gpt_model.sharded_state_dict(), dir)` writes for
a GPTModel built from Megatron-Core's own MLA + MoE specs (local or Transformer Engine names,
`mcore_names.py`). It carries no DeepSeek config of its own (Megatron-LM's common.pt holds its
argparse arguments), so mcore-to-dist takes one: an HF config.json or a JSON of DSV3Config fields
(the `model_config` of one of our checkpoints). Both directions stream: one native tensor (one
expert's slice of a stacked expert tensor) at a time, written as chunks (`distcp.py`).
dist-to-mcore writes the local spec's names, or the TE spec's fused norm names with `--te`, and no
`_extra_state` entries: load it with those left out of the model's sharded state dict (they hold
FP8/TE metadata, not weights).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

from megatron_dsv3.compat.megatron_api import mtp_layer_attribute
from megatron_dsv3.config import DSV3Config
from megatron_dsv3.convert.distcp import DistCheckpointError, DistReader, DistWriter
from megatron_dsv3.convert.hf_to_dist import config_from_json, meta_model, read_json
from megatron_dsv3.convert.mcore_names import Piece, native_checkpoint_names, native_pieces


def read_model_config(path: Union[str, os.PathLike]) -> DSV3Config:
    """An HF config.json (it has "model_type") or a JSON of DSV3Config fields."""
    values = read_json(path, "--model-config")
    if "model_type" in values:
        return config_from_json(values, path)
    return DSV3Config.from_dict(values)


def _our_shapes(config: DSV3Config) -> dict[str, tuple[int, ...]]:
    return {key: tuple(t.shape) for key, t in meta_model(config).state_dict().items()}


def _slices(shape: tuple[int, ...], piece: Piece) -> list[tuple[list[int], list[int], list[int]]]:
    """(native offsets, sizes, our offsets) of the reads that move `piece`: one per expert when the
    native tensor stacks experts in dim 0 and has more than two dims, else one."""
    stop = shape[0] if piece.row_stop is None else piece.row_stop
    rows = stop - piece.row_start
    if len(shape) == 3 and not piece.expert:
        return [([e, 0, 0], [1, *shape[1:]], [e, 0, 0]) for e in range(shape[0])]
    native = [piece.row_start, *[0] * (len(shape) - 1)]
    return [(native, [rows, *shape[1:]], list(piece.offsets))]


def mcore_to_dist(native: Union[str, os.PathLike], out: Union[str, os.PathLike], config: DSV3Config,
                  dtype: torch.dtype = torch.float32, log=lambda message: None, replace: bool = False) -> Path:
    reader = DistReader(native, read_common=False)
    ours = _our_shapes(config)
    plan: list[tuple[str, Piece]] = []
    for name, md in reader.tensors.items():
        for piece in native_pieces(name, tuple(md.size)):
            if piece.key not in ours:
                raise DistCheckpointError(f"native tensor {name} maps to {piece.key}, which the model config "
                                          f"does not have")
            plan.append((name, piece))
    missing = sorted(set(ours) - {piece.key for _, piece in plan})
    if missing:
        raise DistCheckpointError(f"{reader.path} lacks {len(missing)} tensor(s) of the model: our "
                                  + ", ".join(missing[:10]))
    writer = DistWriter(out, replace=replace)
    try:
        for key, shape in ours.items():
            writer.declare(f"model.{key}", shape, dtype)
        for name, piece in plan:
            shape = tuple(reader.tensors[name].size)
            for native_offsets, sizes, our_offsets in _slices(shape, piece):
                chunk = reader.read(name, native_offsets, sizes)
                if piece.expert:
                    chunk = chunk.unsqueeze(0)
                writer.write(f"model.{piece.key}", our_offsets, chunk)
        log(f"{len(plan)} native tensor pieces written")
        reader.verified()
        return writer.close({"step": 0, "optimizer_steps": 0, "consumed_samples": 0,
                             "model_config": config.to_dict(), "converted_from": str(Path(native).resolve())})
    except BaseException:
        writer.abort()
        raise


def dist_to_mcore(checkpoint: Union[str, os.PathLike], out: Union[str, os.PathLike], te: bool = False,
                  dtype: torch.dtype = torch.float32, log=lambda message: None, replace: bool = False) -> Path:
    reader = DistReader(checkpoint)
    if "model_config" not in reader.common:
        raise DistCheckpointError(f"{reader.path / 'common.pt'} holds no model_config: not a dsv3 checkpoint")
    config = DSV3Config.from_dict(reader.common["model_config"])
    ours = _our_shapes(config)
    names = native_checkpoint_names(ours, te, mtp_layer_attribute(), set(range(config.first_k_dense_layers)))
    writer = DistWriter(out, replace=replace)
    try:
        for name, shape in names.items():
            writer.declare(name, shape, dtype)
        for name, shape in names.items():
            for piece in native_pieces(name, shape):
                for native_offsets, sizes, our_offsets in _slices(shape, piece):
                    our_sizes = ([1, *sizes] if piece.expert else sizes)
                    chunk = reader.read(f"model.{piece.key}", our_offsets, our_sizes)
                    writer.write(name, native_offsets, chunk.squeeze(0) if piece.expert else chunk)
        log(f"{len(names)} native tensors written")
        reader.verified()
        return writer.close({})
    except BaseException:
        writer.abort()
        raise
