"""Pipeline parallelism: which part of the model a stage holds, and how Megatron-Core's
forward/backward schedules drive it (1F1B between stages, a plain micro-batch loop without).

Stage s of P holds a contiguous run of decoder layers (`parallel.layout.stage_layers`); the first stage also
holds the embedding, the last the final norm, the output head and the MTP modules. MTP embeds
the tokens ahead with the main model's embedding (report section 2.2), so with P > 1 the last
stage keeps a copy of it, marked `pipeline_copy`; its gradient is summed with the first stage's
over Megatron-Core's embedding group, which keeps the two copies equal. DualPipe and DualPipeV
(section 3.2.1, `dualpipe.py`) give a rank two stages, one `ScheduledModel` chunk each over one
DSV3Model; their first and last stages sit on rank 0 and share the embedding physically.

Activations (and their gradients) cross stages as [seq, batch, hidden] tensors in the training
dtype, BF16 under `train.bf16` and FP32 otherwise: the layout and dtype Megatron's p2p code sizes
its buffers for (`pipeline_dtype`). Inside a stage the model keeps [batch, seq, hidden].
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Iterator, Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig
from torch import nn

from megatron_dsv3.parallel import comm, groups
from megatron_dsv3.pipeline.pieces import stage_pieces


class ScheduledModel:
    """What Megatron-Core's forward_backward_func asks of a model chunk: a `config` (a
    TransformerConfig: the schedules read its pipeline fields, and hidden_size sizes the p2p
    buffers), a `model_type` and `set_input_tensor`. `module` is this rank's DSV3Model, `stage` the
    one of its stages this chunk runs.
    The config names no MoE or MTP layers: their losses are scaled inside the model."""

    model_type = ModelType.encoder_or_decoder

    def __init__(self, module: nn.Module, tensor: int, pipeline: int, dtype: torch.dtype = torch.float32,
                 stage: Optional[int] = None):
        self.module, self.dtype = module, dtype
        self.stage = module.stages[0] if stage is None else stage  # which of the module's stages this chunk runs
        self.last_stage = self.stage == module.num_stages - 1
        model = module.config
        with warnings.catch_warnings():  # its CUDA-graph default warns of a deprecation we do not use
            warnings.simplefilter("ignore", UserWarning)
            self.config = TransformerConfig(num_layers=model.num_layers, hidden_size=model.hidden_size,
                                            num_attention_heads=model.num_attention_heads,
                                            tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
                                            pipeline_dtype=dtype)

    def set_input_tensor(self, tensors: list[Optional[torch.Tensor]]) -> None:
        hidden_sbh = tensors[0] if isinstance(tensors, list) else tensors
        self.module.input_hidden = None if hidden_sbh is None else hidden_sbh.transpose(0, 1)


def forward_backward(schedule, chunks: list[ScheduledModel], batches: Iterator[dict[str, torch.Tensor]],
                     num_micro: int, micro_batch_size: int, seq_length: int, bf16: bool,
                     mtp_loss_weight: Optional[float] = None, forward_only: bool = False) -> list[float]:
    """One step's forward and backward over `num_micro` micro-batches with `schedule` (Megatron's
    forward_backward_func). Every stage reads each batch: the first embeds its tokens, the last
    needs the labels and, for MTP, the tokens ahead. Returns this stage's [lm, mtp, balance] losses
    averaged over the micro-batches (lm and mtp are zero before the last stage). `mtp_loss_weight`
    is this step's lambda (None: the model config's). `chunks`: this rank's model chunks (two under
    DualPipe/DualPipeV, over one module). `forward_only` (evaluation): the schedule's forward-only pass
    (`forward_only=True`) under torch.no_grad, no backward; put the model in eval mode first, so that
    its routers and MTP modules count nothing and no balance loss is added."""
    model = chunks[0].module
    device = next(model.parameters()).device
    sums = [0.0, 0.0, 0.0]

    def loss_func(out) -> tuple[torch.Tensor, dict[str, Any]]:
        sums[0] += float(out.lm_loss) / num_micro
        sums[1] += float(out.mtp_loss) / num_micro if out.mtp_loss is not None else 0.0
        return out.loss, {}  # Megatron divides the loss by num_micro before backward

    def forward_step(data_iterator, chunk: ScheduledModel, return_schedule_plan: bool = False):
        """Megatron's forward_step_func. `return_schedule_plan` (Megatron-Core's keyword; here asked by
        DualPipe's overlapped F&B, `dualpipe.ModelChunk`): the stage's forward as pieces
        (`pieces.stage_pieces`) instead of its output."""
        batch = next(data_iterator)
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

        def stage_output(out):
            if model.last_balance_loss is not None:
                sums[2] += float(model.last_balance_loss) / num_micro
            return out if chunk.last_stage else out.transpose(0, 1).to(chunk.dtype).contiguous()  # [seq, batch, hidden]

        if return_schedule_plan:
            with autocast():
                cut = stage_pieces(chunk.module, tokens, labels, stage=chunk.stage, mtp_loss_weight=mtp_loss_weight,
                                   balance_loss_scale=1.0 / num_micro)
            model_output = cut.output
            return dataclasses.replace(cut, output=lambda state: stage_output(model_output(state)),
                                       context=autocast), loss_func
        with autocast():
            out = chunk.module(tokens, labels=labels, stage=chunk.stage, mtp_loss_weight=mtp_loss_weight,
                               balance_loss_scale=1.0 / num_micro)
        return stage_output(out), loss_func

    with torch.no_grad() if forward_only else contextlib.nullcontext():
        schedule(forward_step_func=forward_step, data_iterator=batches, model=list(chunks), num_microbatches=num_micro,
                 seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only)
    return sums


def reduce_losses(stage_losses: list[float]) -> list[float]:
    """Per-stage losses -> the model's: summed over pipeline stages, averaged over data-parallel
    replicas. Every rank gets the same values, so all agree on stopping a diverged run."""
    t = torch.tensor(stage_losses, dtype=torch.float64)
    if groups.size(groups.pp_group()) > 1:
        comm.all_reduce(t, groups.pp_group())
    if groups.size(groups.dp_group()) > 1:
        comm.all_reduce(t, groups.dp_group())
        t /= groups.size(groups.dp_group())
    return t.tolist()
