"""Megatron-Core GPT datasets from the run's `data:` section (`run_config.DataSection`: its keys,
defaults and checks), and the data-parallel iterator.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import os
from typing import Callable, Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_dsv3.data.corpus import ensure_default_dataset
from megatron_dsv3.data.dali import dali_batches
from megatron_dsv3.parallel import comm
from megatron_dsv3.data.indexed import DataError, open_prefix, validate_prefix
from megatron_dsv3.data.tokenizer import load_tokenizer

def _is_weight(item) -> bool:
    if isinstance(item, numbers.Number) and not isinstance(item, bool):
        return True
    try:
        float(item)
        return True
    except (TypeError, ValueError):
        return False


def parse_blend(paths: list) -> tuple[list[str], Optional[list[float]]]:
    """Prefixes and weights from `[p1, p2]` or `[w1, p1, w2, p2]`."""
    if len(paths) % 2 == 0 and all(_is_weight(w) for w in paths[0::2]):
        prefixes = [os.path.expanduser(str(p)) for p in paths[1::2]]
        weights = [float(w) for w in paths[0::2]]
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"data.paths weights must be finite numbers >= 0 with a positive sum: {weights}")
        return prefixes, weights
    if any(_is_weight(p) for p in paths):
        raise DataError(f"data.paths mixes weights and prefixes unevenly: {paths}")
    return [os.path.expanduser(str(p)) for p in paths], None


def _is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _rank_zero_first(fn, *args, **kwargs):
    """Run `fn` on rank 0, then on the other ranks (which find rank 0's files)."""
    result = fn(*args, **kwargs) if _is_rank_zero() else None
    if torch.distributed.is_initialized():
        comm.barrier()
        if not _is_rank_zero():
            result = fn(*args, **kwargs)
    return result


@contextlib.contextmanager
def _single_process_rank():
    """megatron-core 0.16's BlendedDataset calls `torch.distributed.get_rank()` unguarded when
    it writes its cache; without a process group, let it read rank 0 for the build only."""
    if torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


def resolve_prefixes(data, seq_length: int, vocab_size: int):
    """(prefixes, weights, tokens per prefix), each prefix validated for this model."""
    tokenizer = load_tokenizer(data.tokenizer)
    if data.paths:
        prefixes, weights = parse_blend(data.paths)
    else:
        prefix = _rank_zero_first(
            ensure_default_dataset, os.path.expanduser(data.cache_dir), tokenizer, data.corpus_max_bytes
        )
        prefixes, weights = [prefix], None
    tokens = [validate_prefix(p, vocab_size, seq_length) for p in prefixes]
    return prefixes, weights, tokens


def _gpt_config(data, prefixes, weights, seq_length: int, seed: int) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=data.split,
        path_to_cache=os.path.join(os.path.expanduser(data.cache_dir), "indices"),
        tokenizer=load_tokenizer(data.tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def build_datasets(data, seq_length: int, num_samples: int, seed: int, vocab_size: int):
    """(train, valid) Megatron datasets of the `data` section (valid is None when the split gives
    it no weight). Call on every rank: rank 0 writes the sample indices to the cache, the others
    read them."""
    prefixes, weights, _ = resolve_prefixes(data, seq_length, vocab_size)
    return _build(data, prefixes, weights, seq_length, num_samples, seed)


def _build(data, prefixes, weights, seq_length, num_samples, seed, valid_samples: Optional[int] = None):
    """(train, valid); the valid split indexes `valid_samples` samples (default: data.valid_samples,
    else a tenth of `num_samples`)."""
    config = _gpt_config(data, prefixes, weights, seq_length, seed)
    has_valid = config.split_matrix[1] is not None
    valid_samples = valid_samples or data.valid_samples or max(1, num_samples // 10)
    sizes = [num_samples, valid_samples if has_valid else 0, 0]
    _check_split_parts(data.split, config.split_matrix, prefixes, sizes)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    with _single_process_rank():
        train, valid, _ = builder.build()
    if train is None or len(train) == 0:
        raise DataError(f"data.split {data.split!r} leaves no training samples")
    return train, valid


def _check_split_parts(split: str, split_matrix, prefixes: list[str], sizes: list[int]) -> None:
    """Refuse a split part that is asked for samples but gets no token of a prefix (Megatron's index
    builder would repeat its empty epochs forever): the documents [round(begin * n), round(end * n))
    of each prefix's n, as Megatron cuts them."""
    for prefix in prefixes:
        dataset = open_prefix(prefix)  # kept while its memory-mapped lengths are read
        lengths = dataset.sequence_lengths
        for name, part, size in zip(("training", "validation", "test"), split_matrix, sizes):
            if part is None or not size:
                continue
            begin, end = (int(round(bound * float(len(lengths)))) for bound in part)
            if int(lengths[begin:end].sum()) == 0:
                raise DataError(f"data.split {split!r} leaves no {name} samples: its {name} part of {prefix!r} "
                                f"(documents {begin}..{end} of {len(lengths)}) holds no token; give that part more "
                                "weight or more documents")


def micro_batch_indices(
    n: int, start_sample: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
    dp_size: int,
) -> range:
    """Dataset indices of this rank's `n`-th micro-batch.

    Global batch k holds samples [start + k*G, start + (k+1)*G); rank r reads its contiguous
    G/dp chunk of it, `micro_batch_size` samples at a time.
    """
    per_rank = global_batch_size // dp_size
    step, micro = divmod(n, per_rank // micro_batch_size)
    first = start_sample + step * global_batch_size + dp_rank * per_rank + micro * micro_batch_size
    return range(first, first + micro_batch_size)


def _megatron_batches(dataset, index_fn) -> Iterator[dict]:
    n = 0
    while True:
        samples = [dataset[i % len(dataset)] for i in index_fn(n)]
        yield {
            "tokens": torch.stack([s["tokens"] for s in samples]).long(),
            "labels": torch.stack([s["labels"] for s in samples]).long(),
        }
        n += 1


def build_train_iterator(data, seq_length: int, micro_batch_size: int, global_batch_size: int, dp_rank: int,
                         dp_size: int, seed: int, vocab_size: int, start_sample: int = 0,
                         num_samples: Optional[int] = None) -> Iterator[dict]:
    """Endless `{"tokens", "labels"}` LongTensor[mbs, seq] micro-batches of the `data` section
    (`run_config.DataSection`) for one DP rank.

    `start_sample` is the number of samples already consumed (by all ranks): a resumed run
    passes it to continue exactly where it stopped. `num_samples` (default: about one epoch)
    is how many samples Megatron indexes; past it the iterator wraps around.
    """
    return build_iterators(data, seq_length, micro_batch_size, global_batch_size, dp_rank, dp_size, seed,
                           vocab_size, start_sample, num_samples)[0]


def build_iterators(
    data,
    seq_length: int,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    vocab_size: int,
    start_sample: int = 0,
    num_samples: Optional[int] = None,
    eval_iters: int = 0,
) -> tuple[Iterator[dict], Optional[Callable[[], Iterator[dict]]]]:
    """`build_train_iterator`'s iterator, and with `eval_iters` > 0 the held-out batches: a function
    returning a new iterator over the first `eval_iters` global batches of the valid split (this DP
    rank's micro-batches of them, as the training ones are cut), the same ones at every evaluation.
    They are read from the Megatron dataset whatever `data.backend`; DataError when the split
    gives them no sample."""
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"bad micro_batch_size={micro_batch_size} / dp_rank={dp_rank} of {dp_size}")
    if global_batch_size % (micro_batch_size * dp_size):
        raise DataError(
            f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
            f"{micro_batch_size} x data-parallel size {dp_size}"
        )
    prefixes, weights, tokens = resolve_prefixes(data, seq_length, vocab_size)
    if num_samples is None:
        num_samples = max(global_batch_size, sum(tokens) // seq_length - len(prefixes))
    valid_samples = max(data.valid_samples or 0, eval_iters * global_batch_size) or None
    train, valid = _build(data, prefixes, weights, seq_length, num_samples, seed, valid_samples)

    def index_fn(n):
        return micro_batch_indices(
            n, start_sample, global_batch_size, micro_batch_size, dp_rank, dp_size
        )

    batches = (dali_batches(train, index_fn, micro_batch_size) if data.backend == "dali"
               else _megatron_batches(train, index_fn))
    if eval_iters <= 0:
        return batches, None
    if valid is None or len(valid) == 0:
        raise DataError(f"data.split {data.split!r} leaves no validation samples: give its second number weight")
    micro_batches = eval_iters * global_batch_size // (micro_batch_size * dp_size)

    def valid_index_fn(n):
        return micro_batch_indices(n, 0, global_batch_size, micro_batch_size, dp_rank, dp_size)

    return batches, lambda: itertools.islice(_megatron_batches(valid, valid_index_fn), micro_batches)
