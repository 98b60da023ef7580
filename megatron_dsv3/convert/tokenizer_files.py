"""The run's tokenizer beside exported weights: DeepSeek's `generate.py`, vLLM, SGLang and
transformers' `AutoTokenizer` load it from the checkpoint folder.

    found = run_tokenizer(checkpoint)         # data.tokenizer of <checkpoint.dir>/run_config.yaml
    found = run_tokenizer(checkpoint, spec)   # or the one given (`dsv3-convert dist-to-hf --tokenizer`)
    lines = write_tokenizer(found, folder)    # copies tokenizer.json (+ its tokenizer_config.json and
                                              # special_tokens_map.json), else says why not

A run that trained on `tokenizer.json` gets it copied, with the `tokenizer_config.json` beside it
or, when there is none, one naming the end, pad and begin tokens it found. A run on the byte
tokenizer (UTF-8 bytes; ids 0-255 are bytes, 256 ends a document, 257 pads) has no file to copy:
`note` says so, and the exporter writes it into the folder's README.md, config.json
(`dsv3_tokenizer`) and its output.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_dsv3.data.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer
from megatron_dsv3.run_config import RunConfigError, read_yaml

RUN_CONFIG = "run_config.yaml"  # dsv3-train writes it beside its iter_NNNNNNN folders
SIBLINGS = ("tokenizer_config.json", "special_tokens_map.json")  # copied when beside a tokenizer.json
BYTE_NOTE = ("trained on the byte tokenizer (UTF-8 bytes: ids 0-255 are the bytes, 256 ends a document, 257 "
             "pads): no tokenizer file exists or is exported; encode text as its UTF-8 bytes")


@dataclass
class RunTokenizer:
    """What the export knows of the run's tokenizer."""

    spec: Optional[str]  # "byte", a tokenizer.json path, or None when unknown
    source: str  # where the spec came from
    tokenizer: Optional[object] = None  # loaded (`data.tokenizer`), for its token ids; None when unusable
    problem: Optional[str] = None  # why it is not exported, when it should be
    token_ids: dict = field(default_factory=dict)  # bos/eos/pad_token_id for config.json

    @property
    def is_byte(self) -> bool:
        return isinstance(self.tokenizer, ByteTokenizer)

    @property
    def note(self) -> str:
        """One line for the converter's output and the export's README."""
        if self.is_byte:
            return f"tokenizer: {BYTE_NOTE} (from {self.source})"
        if self.problem is not None:
            return f"tokenizer: NOT exported: {self.problem}; copy the run's tokenizer files beside the weights"
        return f"tokenizer: copied {self.spec} (from {self.source}) as tokenizer.json"


def run_tokenizer(checkpoint: str | Path, spec: Optional[str] = None) -> RunTokenizer:
    """The tokenizer the run that saved `checkpoint` (an iter_NNNNNNN folder) trained with: `spec`
    when given (TokenizerError when it cannot be loaded), else `data.tokenizer` of the run_config.yaml
    dsv3-train wrote beside the checkpoint (a missing or unusable one is a `problem`, not an error:
    the weights are exported all the same)."""
    if spec is not None:
        return _loaded(spec, "--tokenizer", load_tokenizer(spec))
    path = Path(checkpoint).resolve().parent / RUN_CONFIG
    source = str(path)
    if not path.is_file():
        return RunTokenizer(None, source, problem=f"{path} is missing (not a dsv3-train checkpoint?), so the run's "
                                                  "tokenizer is unknown: give --tokenizer PATH or byte")
    try:
        spec = _data_tokenizer(read_yaml(path), path)
    except RunConfigError as error:
        return RunTokenizer(None, source, problem=str(error))
    try:
        return _loaded(spec, source, load_tokenizer(spec))
    except TokenizerError as error:
        return RunTokenizer(spec, source, problem=str(error))


def _loaded(spec: str, source: str, tokenizer) -> RunTokenizer:
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eod_id, "pad_token_id": tokenizer.pad_id}
    return RunTokenizer(spec, source, tokenizer, token_ids=ids)


def _data_tokenizer(values: dict, path: Path) -> str:
    data = values.get("data") or {}
    spec = data.get("tokenizer", "byte") if isinstance(data, dict) else None
    if not isinstance(spec, str) or not spec:
        raise RunConfigError(f"{path}: data.tokenizer is {spec!r}, not 'byte' or a tokenizer.json path")
    return spec


def write_tokenizer(found: RunTokenizer, folder: Path, max_length: int) -> list[str]:
    """Copy the run's tokenizer files into `folder` (nothing for the byte tokenizer or an unusable
    one); returns the names written."""
    if not isinstance(found.tokenizer, HFTokenizer):
        return []
    source = Path(found.tokenizer.path)
    shutil.copyfile(source, folder / "tokenizer.json")
    written = ["tokenizer.json"]
    if source.name == "tokenizer.json":
        for name in SIBLINGS:
            if (source.parent / name).is_file():
                shutil.copyfile(source.parent / name, folder / name)
                written.append(name)
    if "tokenizer_config.json" not in written:
        (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(found.tokenizer, max_length),
                                                                 indent=2) + "\n")
        written.append("tokenizer_config.json")
    return written


def _tokenizer_config(tokenizer: HFTokenizer, max_length: int) -> dict:
    """What AutoTokenizer needs beside a bare tokenizer.json: the fast tokenizer class and its special tokens."""
    names = tokenizer.inv_vocab
    special = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eod_id, "pad_token": tokenizer.pad_id}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
            **{key: names[i] for key, i in special.items() if i is not None}}
