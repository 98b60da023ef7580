"""Analytic parameter counts and a per-GPU memory estimate for a DeepSeek-V3 layout.

The estimate counts what dsv3-train allocates, checked against its rehearsal (`megatron_dsv3.rehearse`,
which measures the program's own tensors on the meta device; BENCHMARKS.md "Memory: rehearsal of one rank at full size"):

- Parameters, gradients and optimizer states of the most loaded pipeline rank, from the stages the
  schedule puts on it (`Schedule.rank_stages`, `Schedule.stage_cut`): the first stage holds the
  embedding, the last the final norm, the output head and the MTP modules (with their own copy of
  the embedding unless the rank holds stage 0 too, as DualPipe's rank 0 does). With
  `train.param_dtype: bfloat16`, Megatron-Core's mixed precision (BF16 weights, FP32 main
  gradients, FP32 master weights), otherwise FP32 weights and gradients; Adam moments in FP32 or
  BF16 (`train.bf16_adam_moments`, report section 3.3.3); master weights and moments sharded over
  data parallel by the distributed optimizer (ZeRO-1) unless `parallel.distributed_optimizer: false`.
- Activations: the tensors each layer keeps for backward (`layer_activation_bytes`: autograd's
  saved tensors under each recompute mode, FP8 caching of linear inputs and weights, the
  attention kernel's inputs), summed over the micro-batches the rank holds at the worst moment of
  its operation list (`simulate.py`: a micro-stage is held from its forward to its input gradient).
- Transient: the backward's working set on top of that, one layer's or the output head's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.parallel.layout import ParallelLayout
from megatron_dsv3.pipeline.schedule import Schedule

GIB = 1024**3
FP8_TILE = 1 + 4 / 128  # an FP8 byte per element plus an FP32 scale per 1x128 tile


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts; `total` and `active` exclude the MTP modules, as the report's 671B / 37B do."""

    embedding: int  # input embedding (the output head has as many)
    dense_layer: int
    moe_layer_shared: int  # attention, norms, router, shared experts of one MoE layer
    moe_layer_routed: int  # the routed experts of one MoE layer
    mtp_module: int
    total: int
    active: int
    routed_all: int  # routed-expert parameters of all MoE layers and MTP modules


def _attention(c: DSV3Config) -> int:
    h, heads = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank:
        q = h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * c.qk_head_dim
    else:
        q = h * heads * c.qk_head_dim
    kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + heads * c.v_head_dim * h + h  # + output projection + input RMSNorm


def count_params(c: DSV3Config) -> ParamCounts:
    h = c.hidden_size
    swiglu = lambda ffn: 3 * h * ffn  # noqa: E731
    dense = _attention(c) + h + swiglu(c.dense_ffn_hidden_size)
    moe_shared = _attention(c) + h + c.num_routed_experts * h + c.num_shared_experts * swiglu(c.moe_ffn_hidden_size)
    moe_routed = c.num_routed_experts * swiglu(c.moe_ffn_hidden_size)
    block = (moe_shared + moe_routed) if c.num_moe_layers else dense
    mtp = 2 * h + 2 * h * h + block + h  # two RMSNorms, the 2h -> h projection, one block, final norm
    embedding = c.vocab_size * h
    trunk = c.first_k_dense_layers * dense + c.num_moe_layers * (moe_shared + moe_routed)
    total = 2 * embedding + trunk + h
    active = total - c.num_moe_layers * (c.num_routed_experts - c.num_experts_per_token) * swiglu(c.moe_ffn_hidden_size)
    return ParamCounts(embedding=embedding, dense_layer=dense, moe_layer_shared=moe_shared, moe_layer_routed=moe_routed,
                       mtp_module=mtp, total=total, active=active,
                       routed_all=moe_routed * (c.num_moe_layers + (c.mtp_num_modules if c.num_moe_layers else 0)))


def rank_params(c: DSV3Config, layout: ParallelLayout, schedule: Schedule, pipeline_rank: int) -> tuple[float, float]:
    """(routed-expert, other) parameters pipeline rank `pipeline_rank` holds, per tensor/expert shard:
    its stages' decoder layers, and the embedding, head and MTP modules of the ends it holds (one
    embedding per rank: DSV3Model keeps one for stage 0 and MTP alike)."""
    counts = count_params(c)
    stages = schedule.rank_stages(layout.pipeline, pipeline_rank)
    last = schedule.num_stages(layout.pipeline) - 1
    cut = schedule.stage_cut(c.num_layers, layout.pipeline)
    layers = [i for s in stages for i in cut[s]]
    moe = sum(c.is_moe_layer(i) for i in layers)
    routed = moe * counts.moe_layer_routed
    shared = moe * counts.moe_layer_shared + (len(layers) - moe) * counts.dense_layer
    if last in stages:
        mtp_routed = counts.moe_layer_routed if c.num_moe_layers else 0
        routed += c.mtp_num_modules * mtp_routed
        shared += c.mtp_num_modules * (counts.mtp_module - mtp_routed) + counts.embedding + c.hidden_size  # head, norm
    if 0 in stages or (last in stages and c.mtp_num_modules):
        shared += counts.embedding
    return routed / (layout.expert * layout.tensor), shared / layout.tensor


def _norm(width: int, act: int) -> float:
    """RMSNorm (FP32 inside) keeps its input in FP32 (a copy, or the FP32 input itself) and the
    normalised input back in `act` bytes."""
    return width * 4 + width * act


def _linear_inputs(width: int, act: int, fp8: bool, readers: int = 1) -> float:
    """What `readers` linears keep of one input: an FP8 copy each (1x128 tiles of its transpose),
    else the input itself, once."""
    return readers * width * FP8_TILE if fp8 else width * act


def _swiglu(width: int, ffn: float, act: int, fp8: bool, recompute: str) -> float:
    """A SwiGLU's own tensors per token (its input's are its caller's): the gate and up outputs;
    without recomputation also silu(gate) and the down projection's input."""
    kept = 2 * ffn * act
    if recompute == "none":
        kept += ffn * act + _linear_inputs(ffn, act, fp8)
    return kept


def layer_activation_bytes(c: DSV3Config, moe: bool, recompute: str, fp8: bool, act: int = 2) -> float:
    """Bytes one decoder layer keeps for backward per token (no tensor parallel, tokens evenly
    routed), `act` the activations' bytes (2 under BF16 autocast). What the code saves:

    - full recomputation: the layer input only.
    - attention: the kernel (SDPA, fused) keeps q, k and v, v zero-padded to the q/k head size, and
      its output at that size plus a log-sum-exp per head; the output projection's input. Selective
      recomputation reruns RMSNorm and the projections but SDPA still keeps q, k and v, so it saves
      only the norm and the low-rank intermediates (and keeps the layer input).
    - MoE: the post-attention norm; the router's BF16 input copy and scores; the routed experts'
      inputs (k per token; FP8 copies under FP8), gate/up outputs (and SwiGLU's), the k expert
      outputs per token that the gating multiply keeps; the shared experts' the same.
    """
    h, heads, qk = c.hidden_size, c.num_attention_heads, c.qk_head_dim
    if recompute == "full":
        return h * act
    kept = 3 * heads * qk * act + heads * qk * act + heads * 4  # q, k, padded v; the output, log-sum-exp
    kept += _linear_inputs(heads * c.v_head_dim, act, fp8)  # output projection
    if recompute == "selective":
        kept += h * act  # the recomputed region's input
    else:
        kept += _norm(h, act) + _linear_inputs(h, act, fp8, readers=2)  # input norm; q_a / q and kv_a
        if c.q_lora_rank:
            kept += _norm(c.q_lora_rank, act) + _linear_inputs(c.q_lora_rank, act, fp8)
        kept += _norm(c.kv_lora_rank, act) + _linear_inputs(c.kv_lora_rank, act, fp8)
    kept += _norm(h, act)  # post-attention norm
    if not fp8 or (moe and act == 4):  # its output, read by BF16/FP32 linears (the router in FP32)
        kept += h * act
    if fp8:  # the FP8 copies of that output: the shared experts' or the dense FFN's gate and up
        kept += _linear_inputs(h, act, fp8, readers=2) if (not moe or c.num_shared_experts) else 0
    if not moe:
        return kept + _swiglu(h, c.dense_ffn_hidden_size, act, fp8, recompute)
    k, ffn = c.num_experts_per_token, c.moe_ffn_hidden_size
    kept += (h * 2 if act == 2 else 0) + c.num_routed_experts * act  # router: its autocast BF16 input, scores
    kept += k * _linear_inputs(h, act, fp8) + _swiglu(h, k * ffn, act, fp8, recompute)  # routed experts
    kept += k * h * act + k * act  # expert outputs and gates, kept by the gating multiply
    return kept + _swiglu(h, c.num_shared_experts * ffn, act, fp8, recompute)


def fp8_weight_bytes(c: DSV3Config, moe: bool, recompute: str, experts_per_rank: int) -> int:
    """FP8 copies of a layer's weights that its linears keep for backward, per micro-batch (a byte
    per weight): the output projection and the gate/up projections, and the rest unless
    recomputation reruns them."""
    if recompute == "full":
        return 0
    h, heads = c.hidden_size, c.num_attention_heads
    kept = heads * c.v_head_dim * h  # output projection
    if recompute == "none":
        kept += _attention(c) - heads * c.v_head_dim * h
    ffns = (experts_per_rank * c.moe_ffn_hidden_size + c.num_shared_experts * c.moe_ffn_hidden_size if moe
            else c.dense_ffn_hidden_size)
    return kept + ffns * h * (2 if recompute == "selective" else 3)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes of the most loaded rank (`pipeline_rank`)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    reserve: float
    params_per_rank: float
    micro_batches_in_flight: float
    transient: float = 0.0  # the backward's working set over the kept activations
    pipeline_rank: int = 0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.transient + self.reserve

    def describe(self, capacity_gib: float | None = None) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.1f}"
                          for name in ("params", "grads", "optimizer", "activations", "transient", "reserve"))
        cap = f" of {capacity_gib:g} GiB" if capacity_gib else ""
        return (f"{self.total / GIB:.1f} GiB{cap} per GPU ({parts} GiB; {self.params_per_rank / 1e9:.2f}B params on "
                f"pipeline rank {self.pipeline_rank})")


def estimate_memory(c: DSV3Config, layout: ParallelLayout, schedule: Schedule, train, reserve_gib: float = 0.0,
                    distributed_optimizer: bool = True, pipeline_rank: Optional[int] = None) -> MemoryEstimate:
    """Per-GPU memory of `c` trained under `layout` and `schedule` with the run's `train:` section
    (`run_config.TrainSection`): of `pipeline_rank`, else of the pipeline rank needing the most."""
    if pipeline_rank is None:
        ranks = [estimate_memory(c, layout, schedule, train, reserve_gib, distributed_optimizer, r)
                 for r in range(layout.pipeline)]
        return max(ranks, key=lambda e: e.total)
    recompute, fp8 = train.recompute, train.fp8 != "none"
    mixed = train.param_dtype == "bfloat16"  # BF16 weights + FP32 masters
    act = 2 if train.bf16 else 4
    routed, shared = rank_params(c, layout, schedule, pipeline_rank)
    per_rank = routed + shared
    moment_bytes = 2 * (2 if train.bf16_adam_moments else 4)
    state_bytes = moment_bytes + (4 if mixed else 0)  # + FP32 master copy under mixed precision
    expert_shards, dense_shards = (layout.expert_data, layout.data) if distributed_optimizer else (1, 1)
    optimizer = state_bytes * (routed / expert_shards + shared / dense_shards)

    tokens = train.seq_length * train.micro_batch_size
    stage_bytes = {s: _stage_activation_bytes(c, layout, schedule, s, train, act) * tokens / layout.tensor
                   for s in schedule.rank_stages(layout.pipeline, pipeline_rank)}
    micro_batches = max(1, train.global_batch_size // (train.micro_batch_size * layout.data))
    activations, held = _held_activation_bytes(schedule, layout.pipeline, micro_batches, pipeline_rank, stage_bytes)
    # The backward of a layer needs about 1.3 times what the layer keeps on top of what is kept (2.5
    # under full recomputation, which first rebuilds it), measured by the rehearsal; the head's the
    # logits' FP32 gradient and copies.
    worst_layer = max(layer_activation_bytes(c, moe, "none", fp8, act) for moe in (True, False)) * tokens / layout.tensor
    head = c.vocab_size * tokens * 8 / layout.tensor
    last = schedule.num_stages(layout.pipeline) - 1
    transient = max((2.5 if recompute == "full" else 1.3) * worst_layer, head if last in stage_bytes else 0)
    return MemoryEstimate(params=(2 if mixed else 4) * per_rank, grads=4 * per_rank, optimizer=optimizer,
                          activations=activations, reserve=reserve_gib * GIB, params_per_rank=per_rank,
                          micro_batches_in_flight=held, transient=transient, pipeline_rank=pipeline_rank)


def _stage_activation_bytes(c: DSV3Config, layout: ParallelLayout, schedule: Schedule, stage: int, train,
                            act: int) -> float:
    """Bytes per token one micro-batch keeps on `stage` between its forward and backward: its
    layers (FP8 weight copies spread over the micro-batch's tokens); on the last stage, the final
    norm, the head's input and FP32 log-softmax, and per MTP depth its two norms, its projection's
    input, its layer (never rerun by full recomputation, which wraps the decoder's layers only) and
    its head's."""
    fp8, h = train.fp8 != "none", c.hidden_size
    tokens = train.seq_length * train.micro_batch_size
    experts_per_rank = c.num_routed_experts // layout.expert
    cut = schedule.stage_cut(c.num_layers, layout.pipeline)
    kept = 0.0
    layers = [(c.is_moe_layer(i), train.recompute) for i in cut[stage]]
    if stage == len(cut) - 1:
        head = _norm(h, act) + h * act + c.vocab_size * 4
        depth = 2 * _norm(h, act) + _linear_inputs(2 * h, act, fp8) + head
        kept += head + c.mtp_num_modules * (depth + (2 * h * h / tokens if fp8 else 0))
        mtp_recompute = "none" if train.recompute == "full" else train.recompute
        layers += [(c.num_moe_layers > 0, mtp_recompute)] * c.mtp_num_modules
    for moe, recompute in layers:
        kept += layer_activation_bytes(c, moe, recompute, fp8, act)
        if fp8:
            kept += fp8_weight_bytes(c, moe, recompute, experts_per_rank) / tokens
    return kept


def _held_activation_bytes(schedule: Schedule, pipeline: int, micro_batches: int, rank: int,
                           stage_bytes: dict[int, float]) -> tuple[float, int]:
    """The most activation bytes `rank` holds at once, walking its operation list (a micro-stage
    is held from its forward until its input gradient), and the micro-stages held then. Without
    operation lists: every micro-batch on each of the rank's stages."""
    if schedule.build_ops is None:
        return micro_batches * sum(stage_bytes.values()), micro_batches * len(stage_bytes)
    held = peak = 0.0
    count = peak_count = 0
    for op in schedule.op_lists(pipeline, micro_batches).ranks[rank]:
        if op.forward is not None:
            held, count = held + stage_bytes[op.forward[1]], count + 1
            if held > peak:
                peak, peak_count = held, count
        if op.backward is not None:
            held, count = held - stage_bytes[op.backward[1]], count - 1
    return peak, peak_count
