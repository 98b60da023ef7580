"""NVIDIA DALI backend: the same samples as the Megatron backend, fed through a DALI pipeline.

`fn.external_source` pulls the (seq_length + 1)-token samples of Megatron's GPTDataset in the
order of `micro_batch_indices` (keyed by DALI's iteration number, so prefetching cannot
reorder them); the pipeline casts to int64 and cuts tokens/labels. It runs on the CPU
(`device_id=None`), so it works on machines without a GPU.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from megatron_dsv3.data.indexed import DataError


def _import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as err:
        raise DataError(
            "data.backend 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120"
        ) from err
    return fn, pipeline_def, types


def dali_batches(
    dataset, index_fn: Callable[[int], range], micro_batch_size: int
) -> Iterator[dict]:
    """Endless `{"tokens", "labels"}` micro-batches; `index_fn(n)` gives batch n's indices."""
    fn, pipeline_def, types = _import_dali()

    def source(batch_info):
        samples = [dataset[i % len(dataset)] for i in index_fn(batch_info.iteration)]
        return [torch.cat([s["tokens"], s["labels"][-1:]]).numpy() for s in samples]

    @pipeline_def(batch_size=micro_batch_size, num_threads=1, device_id=None)
    def pipeline():
        text = fn.external_source(
            source=source, batch=True, batch_info=True, dtype=types.INT64, ndim=1
        )
        return text[:-1], text[1:]

    pipe = pipeline()
    pipe.build()
    return _run(pipe)


def _run(pipe) -> Iterator[dict]:
    while True:
        tokens, labels = pipe.run()
        yield {
            "tokens": torch.from_numpy(np.array(tokens.as_array(), dtype=np.int64)),
            "labels": torch.from_numpy(np.array(labels.as_array(), dtype=np.int64)),
        }
