"""Data: tokenizers, the embedded stdlib corpus, indexed datasets and the train iterator."""
from megatron_dsv3.data.corpus import ensure_default_dataset, stdlib_files
from megatron_dsv3.data.datasets import (
    build_datasets,
    build_iterators,
    build_train_iterator,
    micro_batch_indices,
    parse_blend,
)
from megatron_dsv3.data.indexed import DataError, prepare, token_stats, validate_prefix
from megatron_dsv3.data.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer

__all__ = [
    "ByteTokenizer", "DataError", "HFTokenizer", "TokenizerError", "build_datasets", "build_iterators",
    "build_train_iterator", "ensure_default_dataset", "load_tokenizer", "micro_batch_indices",
    "parse_blend", "prepare", "stdlib_files", "token_stats",
    "validate_prefix",
]
