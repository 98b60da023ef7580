"""Weights to and from Hugging Face DeepseekV3 checkpoints (DeepSeek's published layout).

    from megatron_dsv3.convert.hf import load_hf_checkpoint, export_hf_weights, save_hf_checkpoint
    model = build_model(DSV3Config.from_hf(hf_config))
    load_hf_checkpoint(model, "/path/to/DeepSeek-V3")      # streams the *.safetensors shards
    tensors = export_hf_weights(model, fused_experts=True)  # transformers' in-memory names

Names (N = num_layers, k = MTP depth - 1, e = expert):

    ours                                  Hugging Face
    embed_tokens.weight                   model.embed_tokens.weight
    layers.{i}.<sub>                      model.layers.{i}.<sub> (renames below)
      mlp.router.weight                     mlp.gate.weight
      mlp.router.expert_bias                mlp.gate.e_score_correction_bias
      mlp.experts.gate_up_weight [E,2I,H]   mlp.experts.gate_up_proj (fused, transformers 5), or
                                            mlp.experts.{e}.gate_proj.weight + .up_proj.weight
      mlp.experts.down_weight [E,H,I]       mlp.experts.down_proj (fused), or mlp.experts.{e}.down_proj.weight
    norm.weight                           model.norm.weight
    lm_head.weight                        lm_head.weight
    mtp.{k}.enorm / hnorm / eh_proj       model.layers.{N+k}.enorm / hnorm / eh_proj
    mtp.{k}.layer.<sub>                   model.layers.{N+k}.<sub>
    mtp.{k}.norm.weight                   model.layers.{N+k}.shared_head.norm.weight
    (shared with the main model)          model.layers.{N+k}.embed_tokens.weight, .shared_head.head.weight

The MTP module shares the main embedding and output head (report section 2.2), so the two
per-module copies in DeepSeek's checkpoints have nowhere of their own to go: export writes
copies of the main tensors; load compares each copy with the main tensor and emits an
`MTPCopyMismatchWarning` when they differ (the main tensor is kept). Turn it into an error
with `warnings.simplefilter("error", MTPCopyMismatchWarning)`.

FP8 checkpoints: a float8_e4m3fn `X.weight` with `X.weight_scale_inv` (one FP32 scale per
128x128 block, edge blocks partial) is dequantised to w = q * s before it is copied in.

Memory: `load_hf_checkpoint` reads the safetensors headers first (all names and shapes are
checked before the model is touched), then copies one tensor at a time from memory-mapped
shards, so RAM holds the model plus one tensor (users report 1.2-3 TB of RAM for other
DeepSeek-V3 converters that materialise the full state dict). `save_hf_checkpoint` holds at
most one shard besides the model.

Single process only (tensor- and expert-parallel size 1); a sharded model is refused. At 671B
scale, `dsv3-convert` (megatron_dsv3.convert) writes a distributed checkpoint without ever holding
the model, using `place_weights` here for the name and shape checks.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from megatron_dsv3.fp8.quantize import TILE as FP8_BLOCK, dequantize_blocks
from megatron_dsv3.parallel import groups

_SCALE_SUFFIX = "_scale_inv"  # "X.weight" + "_scale_inv" = "X.weight_scale_inv"
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # old checkpoints carry the rope buffer
_LAYER_RENAMES = {
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "mlp.experts.gate_up_weight": "mlp.experts.gate_up_proj",
    "mlp.experts.down_weight": "mlp.experts.down_proj",
}
_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight")
# Stored in FP32 whatever the checkpoint's dtype, as in DeepSeek-V3's release (and as vLLM and transformers
# keep it): the routing bias. Rounded to BF16 (up to 3.9e-4) it sends tokens to other experts.
_FP32_ALWAYS = re.compile(r"\.mlp\.gate\.e_score_correction_bias$")


class HFWeightError(ValueError):
    """Missing, unexpected or mis-shaped checkpoint keys; the message names them."""


class MTPCopyMismatchWarning(UserWarning):
    """A checkpoint's MTP embedding/head copy differs from the main embedding/head."""


@dataclass
class LoadResult:
    missing: list[str] = field(default_factory=list)  # HF names the model wanted but did not get
    unexpected: list[str] = field(default_factory=list)  # HF names with no place in the model
    dequantized: list[str] = field(default_factory=list)  # FP8 weights dequantised on the way in
    mtp_copies_checked: list[str] = field(default_factory=list)  # MTP embed/head copies compared


# ----------------------------------------------------------------------------- FP8
def dequantize_fp8_blockwise(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """w = q * s with one scale per 128 x 128 block of the last two dims, checking the scale grid:
    q [..., M, N] (float8_e4m3fn or any dtype), scale_inv [..., ceil(M/128), ceil(N/128)]. DeepSeek's
    `weight_scale_inv` is the same per-block scale as `fp8.quantize_blocks` returns (its inverse
    writes them), so the quantiser is the training one."""
    rows, cols = q.shape[-2:]
    expected = (*q.shape[:-2], math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
    if tuple(scale_inv.shape) != expected:
        raise HFWeightError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
                            f"for a {tuple(q.shape)} weight in {FP8_BLOCK}x{FP8_BLOCK} blocks")
    return dequantize_blocks(q, scale_inv)


# ------------------------------------------------------------------------- naming
def stored_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a checkpoint stores Hugging Face tensor `name` in when its weights are `dtype`:
    FP32 for the routing bias (`e_score_correction_bias`), `dtype` for the rest."""
    return torch.float32 if _FP32_ALWAYS.search(name) else dtype


def write_hf_config(folder: Path, config, dtype: torch.dtype, token_ids: Optional[dict] = None, fp8: bool = False,
                 extra: Optional[dict] = None) -> Path:
    """config.json of `config` (`DSV3Config.to_hf_dict`: DeepSeek-V3's release fields, both RoPE forms),
    with `torch_dtype` from `dtype`; `extra` fields added."""
    values = config.to_hf_dict(str(dtype).removeprefix("torch."), token_ids, fp8)
    path = Path(folder) / "config.json"
    path.write_text(json.dumps({**values, **(extra or {})}, indent=2) + "\n")
    return path


def _layer_sub(sub: str) -> str:
    return _LAYER_RENAMES.get(sub, sub)


def hf_name(key: str, num_layers: int) -> str:
    """Our state-dict key -> its Hugging Face name (experts in the fused form)."""
    if key in ("embed_tokens.weight", "norm.weight"):
        return "model." + key
    if key == "lm_head.weight":
        return key
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m:
        return f"model.layers.{m[1]}.{_layer_sub(m[2])}"
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", key)
    if m:
        prefix, rest = f"model.layers.{num_layers + int(m[1])}.", m[2]
        if rest.startswith("layer."):
            return prefix + _layer_sub(rest[len("layer."):])
        if rest == "norm.weight":
            return prefix + "shared_head.norm.weight"
        if rest in _MTP_OWN:
            return prefix + rest
    raise HFWeightError(f"no Hugging Face name is known for our key {key!r}")


@dataclass
class _Slot:
    """One tensor of our model and the HF names that fill it."""

    key: str
    target: torch.Tensor
    fused: str
    parts: dict[str, tuple[int, slice]] = field(default_factory=dict)  # per-expert name -> (expert, rows)

    def view(self, part: Optional[tuple[int, slice]]) -> torch.Tensor:
        return self.target if part is None else self.target[part[0], part[1]]


def _expert_parts(slot: _Slot) -> None:
    if slot.fused.endswith(".mlp.experts.gate_up_proj"):
        base = slot.fused[:-len("gate_up_proj")]
        experts, two_i = slot.target.shape[:2]
        i = two_i // 2
        for e in range(experts):
            slot.parts[f"{base}{e}.gate_proj.weight"] = (e, slice(0, i))
            slot.parts[f"{base}{e}.up_proj.weight"] = (e, slice(i, two_i))
    elif slot.fused.endswith(".mlp.experts.down_proj"):
        base = slot.fused[:-len("down_proj")]
        for e in range(slot.target.shape[0]):
            slot.parts[f"{base}{e}.down_proj.weight"] = (e, slice(None))


def _check_unsharded(model: nn.Module) -> None:
    layout = groups.layout()
    if layout.tensor > 1 or layout.expert > 1 or layout.pipeline > 1:
        raise NotImplementedError(
            "Hugging Face conversion needs an unsharded model (tensor, expert and pipeline parallel size 1); "
            f"this process holds a shard (tensor={layout.tensor}, expert={layout.expert}, "
            f"pipeline={layout.pipeline}). "
            "Convert in a single process and save a distributed checkpoint from there.")


def _slots(model: nn.Module) -> dict[str, _Slot]:
    _check_unsharded(model)
    num_layers = model.config.num_layers
    slots = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        slot = _Slot(key, tensor, hf_name(key, num_layers))
        _expert_parts(slot)
        slots[key] = slot
    return slots


def _mtp_copies(model: nn.Module) -> dict[str, str]:
    """HF names of the MTP embedding/head copies -> our key of the main tensor they copy."""
    n = model.config.num_layers
    copies = {}
    for k in range(len(getattr(model, "mtp", ()))):
        copies[f"model.layers.{n + k}.embed_tokens.weight"] = "embed_tokens.weight"
        copies[f"model.layers.{n + k}.shared_head.head.weight"] = "lm_head.weight"
    return copies


# ------------------------------------------------------------------------- export
def iter_hf_weights(model: nn.Module, fused_experts: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs, one at a time. Whole tensors are detached views of the model's;
    per-expert slices and MTP embedding/head copies are fresh clones (safetensors refuses
    tensors that share storage)."""
    slots = _slots(model)
    copies = _mtp_copies(model)
    main = {copy: slots[key].target for copy, key in copies.items()}
    for slot in slots.values():
        if slot.parts and not fused_experts:
            for name, part in slot.parts.items():
                yield name, slot.view(part).detach().clone()
        else:
            yield slot.fused, slot.target.detach()
        if slot.key.startswith("mtp.") and slot.key.endswith(".norm.weight") and ".layer." not in slot.key:
            prefix = slot.fused[:-len("shared_head.norm.weight")]
            for copy in (prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"):
                yield copy, main[copy].detach().clone()


def export_hf_weights(model: nn.Module, fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face DeepseekV3 names.

    fused_experts=False: per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` as in DeepSeek's
    published checkpoints; True: `mlp.experts.gate_up_proj [E,2I,H]` / `down_proj [E,H,I]` as
    transformers 5 holds them in memory. MTP module k is written at layer num_layers + k with
    copies of the main embedding and head."""
    return dict(iter_hf_weights(model, fused_experts))


def save_hf_checkpoint(model: nn.Module, path: Union[str, os.PathLike], fused_experts: bool = False,
                       max_shard_bytes: int = 4 * 2**30, write_config: bool = True) -> list[Path]:
    """Write safetensors shards + model.safetensors.index.json (+ config.json, `write_hf_config`); the
    routing bias in FP32. Returns the shard paths. RAM beyond the model: one shard."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    files: list[Path] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        if not shards[-1]:
            return
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shards[-1].items()}, str(out / name), metadata={"format": "pt"})
        files.append(out / name)
        weight_map.update({k: name for k in shards[-1]})
        shards[-1], sizes[-1] = {}, 0

    for name, tensor in iter_hf_weights(model, fused_experts):
        tensor = tensor.to(stored_dtype(name, tensor.dtype))
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = tensor
        sizes[-1] += nbytes
    flush()
    total = sum(f.stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if write_config:
        write_hf_config(out, model.config, model.embed_tokens.weight.dtype if model.embed_tokens is not None
                     else torch.float32)
    return files


# --------------------------------------------------------------------------- load
class _Source:
    """Tensors by name with cheap shape/dtype lookups; `groups()` gives the reading order."""

    shapes: dict[str, tuple[int, ...]]
    fp8: set[str]

    def groups(self) -> list[list[str]]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class _DictSource(_Source):
    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self.state_dict = state_dict
        self.shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        self.fp8 = {k for k, v in state_dict.items() if v.dtype in _FP8_DTYPES}

    def groups(self) -> list[list[str]]:
        return [list(self.state_dict)]

    def get(self, name: str) -> torch.Tensor:
        return self.state_dict[name]


_FP8_DTYPES = {torch.float8_e4m3fn}


class _SafetensorsSource(_Source):
    """Shards opened lazily (memory-mapped); one tensor materialised at a time."""

    def __init__(self, files: list[Path]):
        self._open = safe_open
        self.file_of: dict[str, Path] = {}
        self.shapes, self.fp8 = {}, set()
        self.order: list[list[str]] = []
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                for name in names:
                    if name in self.file_of:
                        raise HFWeightError(f"{name} appears in both {self.file_of[name].name} and {path.name}")
                    sl = f.get_slice(name)
                    self.file_of[name] = path
                    self.shapes[name] = tuple(sl.get_shape())
                    if sl.get_dtype().upper().startswith("F8_E4M3"):
                        self.fp8.add(name)
            self.order.append(names)
        self._handle = None
        self._handle_path = None

    def groups(self) -> list[list[str]]:
        return self.order

    def get(self, name: str) -> torch.Tensor:
        path = self.file_of[name]
        if self._handle_path != path:
            self.close()
            self._handle = self._open(str(path), framework="pt").__enter__()
            self._handle_path = path
        return self._handle.get_tensor(name)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._handle_path = None, None


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class WeightPlacement:
    """Where each Hugging Face tensor of a checkpoint goes in our model, checked against its shapes."""

    slots: dict[str, _Slot]
    targets: dict[str, tuple[_Slot, Optional[tuple[int, slice]]]]  # HF name -> (our slot, expert part or None)
    copies: dict[str, str]  # MTP embedding/head copies present: HF name -> our key of the main tensor
    scales: dict[str, str]  # FP8 weight -> its weight_scale_inv
    result: LoadResult


def place_weights(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], fp8: set[str],
                  strict: bool) -> WeightPlacement:
    """Check a checkpoint's names and shapes (`shapes`: HF name -> shape, `fp8`: names stored as
    float8) against `model` (any device, `meta` included) before anything is read. Mis-shaped
    tensors and scale grids always raise HFWeightError naming them; missing or unexpected names
    raise when `strict`."""
    slots = _slots(model)
    mtp_copies = _mtp_copies(model)
    where: dict[str, tuple[_Slot, Optional[tuple[int, slice]]]] = {}
    for slot in slots.values():
        where[slot.fused] = (slot, None)
        for name, part in slot.parts.items():
            where[name] = (slot, part)

    result = LoadResult()
    misshaped: list[str] = []
    scales = {name[:-len(_SCALE_SUFFIX)]: name for name in shapes if name.endswith(".weight" + _SCALE_SUFFIX)}
    targets: dict[str, tuple[_Slot, Optional[tuple[int, slice]]]] = {}
    copies: dict[str, str] = {}
    for name, shape in shapes.items():
        if name.endswith(_SCALE_SUFFIX) and name[:-len(_SCALE_SUFFIX)] in shapes:
            continue  # read together with its weight
        if _IGNORED.search(name):
            continue
        if name in fp8 and name not in scales:
            misshaped.append(f"{name}: float8 weight without {name}{_SCALE_SUFFIX}")
            continue
        if name in scales:
            rows, cols = shape[-2:]
            want = (*shape[:-2], math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
            got = tuple(shapes[scales[name]])
            if got != want:
                misshaped.append(f"{scales[name]}: shape {got}, expected {want} for a {shape} weight")
                continue
        if name in mtp_copies:
            expected = tuple(slots[mtp_copies[name]].target.shape)
            if shape != expected:
                misshaped.append(f"{name}: checkpoint {shape}, model {expected}")
            else:
                copies[name] = mtp_copies[name]
            continue
        if name not in where:
            result.unexpected.append(name)
            continue
        slot, part = where[name]
        expected = tuple(slot.view(part).shape)
        if shape != expected:
            misshaped.append(f"{name}: checkpoint {shape}, model {expected} (our {slot.key})")
            continue
        targets[name] = (slot, part)

    for slot in slots.values():
        have_fused = slot.fused in targets
        have_parts = [n for n in slot.parts if n in targets]
        if have_fused and have_parts:
            misshaped.append(f"{slot.fused}: given both fused and per-expert ({have_parts[0]}, ...)")
        elif have_fused or (slot.parts and len(have_parts) == len(slot.parts)):
            continue
        elif have_parts:
            result.missing += [n for n in slot.parts if n not in targets]
        else:
            result.missing.append(slot.fused + (" (or per-expert experts.{e}.*_proj.weight)" if slot.parts else ""))

    if misshaped:
        raise HFWeightError(f"{len(misshaped)} mis-shaped checkpoint tensor(s): " + "; ".join(misshaped))
    if strict and (result.missing or result.unexpected):
        raise HFWeightError(_strict_message(model, result))
    return WeightPlacement(slots, targets, copies, scales, result)


def _load(model: nn.Module, source: _Source, strict: bool) -> LoadResult:
    placement = place_weights(model, source.shapes, source.fp8, strict)
    slots, targets, scales, result = placement.slots, placement.targets, placement.scales, placement.result
    with torch.no_grad():
        for group in source.groups():
            for name in group:
                if name not in targets:
                    continue
                slot, part = targets[name]
                slot.view(part).copy_(_read(source, name, scales, result))
        for name, key in placement.copies.items():
            main = slots[key].target
            copy = _read(source, name, scales, result).to(main.dtype)
            result.mtp_copies_checked.append(name)
            check_mtp_copy(name, copy, main, hf_name(key, model.config.num_layers))
    return result


def check_mtp_copy(name: str, copy: torch.Tensor, main: torch.Tensor, main_name: str) -> None:
    """Warn (MTPCopyMismatchWarning) when an MTP module's embedding/head copy differs from the main tensor."""
    if not torch.equal(copy, main):
        diff = (copy.float() - main.float()).abs().max().item()
        warnings.warn(f"{name} differs from the main model's {main_name} (max abs diff {diff:.3g}); "
                      "the MTP module shares the main tensor, which is kept", MTPCopyMismatchWarning, stacklevel=4)


def _read(source: _Source, name: str, scales: dict[str, str], result: LoadResult) -> torch.Tensor:
    tensor = source.get(name)
    if name in scales:
        tensor = dequantize_fp8_blockwise(tensor, source.get(scales[name]))
        result.dequantized.append(name)
    return tensor


def _strict_message(model: nn.Module, result: LoadResult) -> str:
    lines = ["checkpoint does not match the model (pass strict=False to load what matches):"]
    if result.missing:
        lines.append(f"  missing {len(result.missing)}: {_listing(result.missing)}")
    if result.unexpected:
        lines.append(f"  unexpected {len(result.unexpected)}: {_listing(result.unexpected)}")
        n = model.config.num_layers
        extra = sorted({int(m[1]) for k in result.unexpected if (m := re.match(r"model\.layers\.(\d+)\.", k))
                        and int(m[1]) >= n})
        if extra:
            lines.append(f"  the checkpoint has layers {extra} beyond num_layers={n}: MTP modules? the model "
                         f"has mtp_num_modules={model.config.mtp_num_modules}")
    missing_layers = {int(m[1]) for k in result.missing if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if any(i >= model.config.num_layers for i in missing_layers):
        lines.append("  MTP weights (layers >= num_layers) are missing; a transformers save_pretrained checkpoint "
                     "has none: build with mtp_num_modules=0 or pass strict=False")
    return "\n".join(lines)


def load_hf_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> LoadResult:
    """Copy a Hugging Face DeepseekV3 state dict (per-expert or fused experts, BF16/FP32 or FP8
    with weight_scale_inv) into `model`. All names and shapes are checked before anything is
    copied. strict=True raises HFWeightError on missing or unexpected keys; mis-shaped keys
    always raise."""
    return _load(model, _DictSource(state_dict), strict)


def _shard_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def load_hf_checkpoint(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> LoadResult:
    """Load a directory of safetensors shards (or one file) into `model`, one tensor at a time."""
    source = _SafetensorsSource(_shard_files(Path(path)))
    try:
        return _load(model, source, strict)
    finally:
        source.close()


__all__ = ["HFWeightError", "LoadResult", "MTPCopyMismatchWarning", "WeightPlacement", "dequantize_fp8_blockwise",
           "export_hf_weights", "hf_name", "iter_hf_weights", "load_hf_checkpoint", "load_hf_weights",
           "place_weights", "save_hf_checkpoint", "stored_dtype", "write_hf_config"]
