"""What Megatron-LM's `pretrain()` calls each micro-batch and once for the data: the forward step
and its loss, the datasets, and which pipeline ranks hold an embedding.

A chunk reads a batch when it embeds tokens (the first model stage), computes the loss (the last)
or runs MTP (which embeds the tokens again): those flags are the chunk's own (`pre_process`,
`post_process`, `mtp_process`), so the same step serves Megatron's placement and the dual
schedules'. Every tensor-parallel rank reads the batch itself (the same samples, as they share
a data-parallel rank), so no broadcast is needed. MLA computes causal attention over positions
0..s-1 itself: the attention mask is not built.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.utils import get_attr_wrapped_model
from megatron.training import get_args, get_tokenizer
from megatron.training.utils import get_blend_and_blend_per_split

from megatron_dsv3.megatron_lm.arguments import dual
from megatron_dsv3.megatron_lm.model import chunk_stage, total_stages


def _reads_batch(model: Any) -> bool:
    return any(get_attr_wrapped_model(model, flag, allow_none=True) for flag in ("pre_process", "post_process",
                                                                                    "mtp_process"))


def get_batch(data_iterator: Any, model: Any) -> Optional[dict[str, torch.Tensor]]:
    """The micro-batch (tokens, labels, loss_mask, position_ids) on the device, or None for a chunk
    that only passes hidden states on."""
    if not _reads_batch(model):
        return None
    batch = next(data_iterator)
    return {key: batch[key].cuda(non_blocking=True) for key in ("tokens", "labels", "loss_mask", "position_ids")}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's per-token loss convention: (sum of masked token losses, token count, report)."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    tokens = mask.sum().detach().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.detach().view(1), tokens.view(1)])}


def forward_step(data_iterator: Any, model: Any):
    """One micro-batch through one chunk: (output, loss function) as Megatron's schedules expect."""
    batch = get_batch(data_iterator, model)
    if batch is None:
        return model(None, None, None), partial(loss_func, None)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"])


def _dataset_config(args: Any) -> GPTDatasetConfig:
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    values = dict(random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
                  blend_per_split=blend_per_split, split=args.split, path_to_cache=args.data_cache_path,
                  mmap_bin_files=args.mmap_bin_files, tokenizer=get_tokenizer(),
                  reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
                  eod_mask_loss=args.eod_mask_loss, create_attention_mask=False,
                  num_dataset_builder_threads=args.num_dataset_builder_threads)
    known = {f.name for f in dataclasses.fields(GPTDatasetConfig)}
    return GPTDatasetConfig(**{k: v for k, v in values.items() if k in known})


def builds_data(args: Any, pp_rank: int, vp_stage: Optional[int]) -> bool:
    """Whether pipeline rank `pp_rank`'s chunk `vp_stage` reads batches (see the module docstring)."""
    return chunk_stage(args, pp_rank, vp_stage) in (0, total_stages(args) - 1)


def datasets_provider(train_val_test_num_samples: list[int], vp_stage: Optional[int] = None):
    """Megatron's train/valid/test datasets: its mock dataset (--mock-data) or GPTDataset over
    --data-path (Megatron's indexed format, which `dsv3-prepare` writes)."""
    args = get_args()
    built_here = partial(builds_data, args, parallel_state.get_pipeline_model_parallel_rank(), vp_stage)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples, built_here,
                                         _dataset_config(args)).build()


datasets_provider.is_distributed = True  # every rank builds (or skips) its own, as pretrain_gpt.py's does


def embedding_ranks(schedule: str, pp_ranks: list[int]) -> list[int]:
    """Megatron's embedding group: the pipeline ranks whose embedding copies Megatron keeps equal.
    Megatron's placement: the first rank, and the last when it runs MTP (our MTP reads the
    embedding). The dual schedules hold the first and last stage on rank 0 (and, DualPipe, their
    mirror copies on the last rank, summed over the mirror group): rank 0 only."""
    if dual(schedule) is not None or len(pp_ranks) == 1:
        return [pp_ranks[0]]
    args = get_args()
    last = [pp_ranks[-1]] if args.mtp_num_layers or not args.untie_embeddings_and_output_weights else []
    return [pp_ranks[0], *last]
