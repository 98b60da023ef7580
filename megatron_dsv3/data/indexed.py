"""Text and JSONL documents to Megatron's indexed format (.bin + .idx), and checks on it.

One document is one text file, or one line of a .jsonl file. Each document is written as one
sequence closed by `end_document`, so Megatron's GPTDataset sees the document boundaries.
Files are written under a temporary name and renamed at the end, so an interrupted prepare
never leaves a prefix that looks complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_dsv3.data.tokenizer import load_tokenizer

TEXT_SUFFIXES = (".txt", ".text", ".md", ".py", ".rst")
MAX_DOCUMENT_BYTES = 2**30  # one text file or .jsonl line: Megatron's index holds int32 lengths
MAX_INPUT_FILES = 1_000_000


class DataError(ValueError):
    """Data that cannot be used as asked; the message names the file, prefix or limit."""


@dataclass
class PrepareStats:
    prefix: str
    num_documents: int
    num_tokens: int


def list_input_files(inputs: Sequence[str]) -> list[str]:
    """Files named in `inputs`; a directory contributes its text and .jsonl files, sorted."""
    files = []
    for item in inputs:
        path = os.path.expanduser(item)
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.endswith(TEXT_SUFFIXES + (".jsonl",))
            )
            if not found:
                raise DataError(f"input directory {path} holds no text or .jsonl files")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f"input not found: {path}")
        if len(files) > MAX_INPUT_FILES:
            raise DataError(f"the inputs hold more than {MAX_INPUT_FILES} files: prepare them in parts")
    return files


def iter_documents(files: Iterable[str], json_key: str = "text") -> Iterator[str]:
    """Documents of `files`: a whole text file, or the `json_key` field of each .jsonl line."""
    for path in files:
        try:
            if path.endswith(".jsonl"):
                yield from _jsonl_documents(path, json_key)
            else:
                if os.path.getsize(path) > MAX_DOCUMENT_BYTES:
                    raise DataError(f"{path} is {os.path.getsize(path)} bytes, above the {MAX_DOCUMENT_BYTES} one "
                                    "document may have: split it, or make it a .jsonl of documents")
                with open(path, encoding="utf-8") as f:
                    yield f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read {path}: {err}") from err


def _jsonl_documents(path: str, json_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        line_no = 0
        while line := f.readline(MAX_DOCUMENT_BYTES + 1):
            line_no += 1
            if len(line) > MAX_DOCUMENT_BYTES:
                raise DataError(f"{path}:{line_no}: a line of more than {MAX_DOCUMENT_BYTES} characters, above what one "
                                "document may have")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                raise DataError(f"{path}:{line_no}: invalid JSON ({getattr(err, 'msg', 'nested too deeply')})") from None
            if not isinstance(record, dict) or json_key not in record:
                raise DataError(f"{path}:{line_no}: no key {json_key!r} in this JSON line")
            yield str(record[json_key])


def write_indexed(
    documents: Iterable[str], output_prefix: str, tokenizer="byte", append_eod: bool = True
) -> PrepareStats:
    """Tokenize `documents` into `output_prefix`.bin/.idx (dtype from the vocabulary size)."""
    tokenizer = load_tokenizer(tokenizer)
    output_prefix = os.path.expanduser(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}"
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(tmp), dtype=dtype)
    num_docs = num_tokens = 0
    try:
        for text in documents:
            ids = tokenizer.encode_np(text)
            if append_eod:
                ids = np.append(ids, tokenizer.eod)
            if ids.size == 0:
                continue
            builder.add_document(ids, [ids.size])
            num_docs += 1
            num_tokens += int(ids.size)
        builder.finalize(get_idx_path(tmp))
        if num_docs == 0:
            raise DataError(f"no tokens to write to {output_prefix}: the input is empty")
        os.replace(get_bin_path(tmp), get_bin_path(output_prefix))
        os.replace(get_idx_path(tmp), get_idx_path(output_prefix))
    finally:
        builder.data_file.close()
        for path in (get_bin_path(tmp), get_idx_path(tmp)):
            if os.path.exists(path):
                os.remove(path)
    return PrepareStats(output_prefix, num_docs, num_tokens)


def prepare(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer="byte",
    json_key: str = "text",
    append_eod: bool = True,
) -> PrepareStats:
    """Text files / directories / .jsonl files to one indexed dataset at `output_prefix`."""
    files = list_input_files(inputs)
    return write_indexed(iter_documents(files, json_key), output_prefix, tokenizer, append_eod)


def open_prefix(prefix: str) -> IndexedDataset:
    """The indexed dataset at `prefix`, or a DataError naming the missing or unreadable file."""
    for path in (get_idx_path(prefix), get_bin_path(prefix)):
        if not os.path.isfile(path):
            raise DataError(f"data prefix {prefix!r}: {path} is missing (run dsv3-prepare)")
        if not os.access(path, os.R_OK):
            raise DataError(f"data prefix {prefix!r}: {path} is not readable")
    try:
        return IndexedDataset(prefix, mmap=True)
    except Exception as err:
        raise DataError(f"data prefix {prefix!r} is not a Megatron indexed dataset: {err}") from err


def token_stats(prefix: str) -> tuple[int, int]:
    """(number of tokens, largest token id) of the dataset at `prefix`."""
    dataset = open_prefix(prefix)
    num_tokens = int(dataset.sequence_lengths.sum())
    dtype = dataset.index.dtype
    expected = num_tokens * np.dtype(dtype).itemsize
    if os.path.getsize(get_bin_path(prefix)) < expected:
        raise DataError(f"data prefix {prefix!r}: .bin is shorter than its .idx says (truncated?)")
    if num_tokens == 0:
        return 0, -1
    tokens = np.memmap(get_bin_path(prefix), dtype=dtype, mode="r", shape=(num_tokens,))
    return num_tokens, int(tokens.max())


def validate_prefix(prefix: str, vocab_size: int, seq_length: int) -> int:
    """Refuse a prefix the model cannot train on; returns its number of tokens."""
    num_tokens, max_id = token_stats(prefix)
    if max_id >= vocab_size:
        raise DataError(
            f"data prefix {prefix!r} holds token id {max_id}, but the model's vocab_size is "
            f"{vocab_size}: use a larger vocab_size or the tokenizer the data was prepared with"
        )
    if num_tokens < seq_length + 1:
        raise DataError(
            f"data prefix {prefix!r} has {num_tokens} tokens, fewer than seq_length + 1 = "
            f"{seq_length + 1}"
        )
    return num_tokens
