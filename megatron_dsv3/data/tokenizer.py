"""Tokenizers that need no download: raw UTF-8 bytes, or a local Hugging Face tokenizer.json.

Both satisfy what Megatron-Core's `GPTDatasetConfig` reads from a tokenizer (`vocab_size`,
`eod`, `pad`, `unique_identifiers`) by subclassing `MegatronTokenizerBase`.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Iterable, Optional

import numpy as np
from megatron.core.tokenizers import MegatronTokenizerBase

_EOD_NAMES = (
    "<｜end▁of▁sentence｜>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>"
)
_PAD_NAMES = ("<｜▁pad▁｜>", "<pad>", "<|pad|>", "[PAD]")
_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>")


MAX_TOKENIZER_BYTES = 256 * 2**20  # DeepSeek-V3's tokenizer.json is 7.5 MiB


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be loaded; the message says why."""


class _MegatronAdapter(MegatronTokenizerBase):
    """The parts of Megatron's tokenizer interface that its GPT datasets use."""

    eod_id: int
    pad_id: Optional[int]
    bos_id: Optional[int] = None  # what a Hugging Face export's config.json names (bos_token_id)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_np(self, text: str) -> np.ndarray:
        """Token ids of `text` as an int64 array (fast path for corpus preparation)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no chat template")

    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def pad(self) -> int:
        return -1 if self.pad_id is None else self.pad_id

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Identity used by Megatron to name cached sample indices."""
        return OrderedDict(cls=type(self).__name__, name=self.name, vocab_size=self.vocab_size)


class ByteTokenizer(_MegatronAdapter):
    """UTF-8 bytes: ids 0..255 are bytes, 256 ends a document, 257 pads."""

    name = "byte"
    eod_id = 256
    pad_id = 257

    def __init__(self) -> None:  # MegatronTokenizerBase wants a path and config: none here
        pass

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def vocab(self) -> dict:
        vocab = {bytes([i]).decode("latin-1"): i for i in range(256)}
        vocab.update({"<eod>": self.eod_id, "<pad>": self.pad_id})
        return vocab

    @property
    def inv_vocab(self) -> dict:
        return {i: t for t, i in self.vocab.items()}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_np(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer(_MegatronAdapter):
    """A Hugging Face `tokenizers` JSON file read from disk."""

    def __init__(self, path: str) -> None:
        try:  # optional dependency, needed for tokenizer.json files only
            from tokenizers import Tokenizer
        except ImportError as err:
            raise TokenizerError(
                f"tokenizer {path!r} needs the 'tokenizers' library: pip install tokenizers"
            ) from err
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file not found: {path}")
        if os.path.getsize(path) > MAX_TOKENIZER_BYTES:
            raise TokenizerError(f"tokenizer {path} is {os.path.getsize(path)} bytes, not a tokenizer.json (those are "
                                 f"at most {MAX_TOKENIZER_BYTES // 2**20} MiB)")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as err:
            raise TokenizerError(f"cannot read tokenizer file {path}: {err}") from err
        with open(path, "rb") as f:
            self.name = "hf-" + hashlib.sha256(f.read()).hexdigest()[:12]
        self.path = path
        self.eod_id = self._first_token(_EOD_NAMES)
        if self.eod_id is None:
            raise TokenizerError(f"tokenizer {path} has none of the end tokens {_EOD_NAMES}")
        self.pad_id = self._first_token(_PAD_NAMES)
        self.bos_id = self._first_token(_BOS_NAMES)

    def _first_token(self, names) -> Optional[int]:
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict:
        return {i: t for t, i in self.vocab.items()}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec) -> _MegatronAdapter:
    """`"byte"` (or None) for `ByteTokenizer`, a path to tokenizer.json for `HFTokenizer`;
    an already-built tokenizer is returned as is."""
    if isinstance(spec, _MegatronAdapter):
        return spec
    if spec is None or spec == "byte":
        return ByteTokenizer()
    spec = os.path.expanduser(str(spec))
    if not spec.endswith(".json") and not os.path.isfile(spec):
        raise TokenizerError(f"unknown tokenizer {spec!r}: use 'byte' or a path to tokenizer.json")
    return HFTokenizer(spec)
