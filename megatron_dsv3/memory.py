"""Analytic parameter counts and a per-GPU memory estimate for a DeepSeek-V3 layout.

Parameters, gradients and optimizer states follow what dsv3-train holds: with
`train.param_dtype: bfloat16`, Megatron-Core's mixed precision (BF16 weights, FP32 main gradients,
FP32 master weights), otherwise FP32 weights and gradients; Adam moments in FP32 or BF16
(`train.bf16_adam_moments`, report section 3.3.3); master weights and moments sharded over data
parallel by the distributed optimizer (ZeRO-1) unless `parallel.distributed_optimizer: false`. Activations count
what one layer saves for backward per token, with the report's selective recomputation (section
3.2.3: RMSNorm and MLA up-projections; SwiGLU outputs) and FP8 caching of linear inputs
(section 3.3.3), times the micro-batches a rank holds in flight under the pipeline schedule
(its descriptor's `micro_batches_held`: the peak over the simulator's operation lists).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.parallel.layout import ParallelLayout
from megatron_dsv3.pipeline.schedule import Schedule

GIB = 1024**3


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


def layer_activation_bytes(c: DSV3Config, moe: bool, recompute: str, fp8: bool) -> int:
    """Bytes one layer keeps for backward per token (no tensor parallel)."""
    h, heads, act = c.hidden_size, c.num_attention_heads, 2  # BF16
    lin = 1 if fp8 else 2  # linear inputs cached in FP8 (1x128 tiles) under FP8 training
    keep_norm_and_up = recompute == "none"  # selective recomputes RMSNorm, MLA up-projections, SwiGLU output
    saved = [h * act]  # layer input, for the attention RMSNorm
    if keep_norm_and_up:
        saved.append(h * lin)  # RMSNorm output = input of the down-projections
    if c.q_lora_rank:
        saved.append(c.q_lora_rank * act)  # compressed query c_Q
        if keep_norm_and_up:
            saved.append(c.q_lora_rank * lin)
    saved.append((c.kv_lora_rank + c.qk_rope_head_dim) * act)  # c_KV and the rope key
    if keep_norm_and_up:
        saved += [c.kv_lora_rank * lin, heads * c.qk_head_dim * act,  # normed c_KV; q
                  heads * (c.qk_head_dim + c.v_head_dim) * act]  # k, v
    saved.append(heads * c.v_head_dim * act)  # attention output, kept for the attention backward
    if fp8:
        saved.append(heads * c.v_head_dim)  # its FP8 copy, input of the output projection
    saved.append(h * act)  # input of the FFN RMSNorm
    if keep_norm_and_up:
        saved.append(h * lin)
    if moe:
        k, ffn = c.num_experts_per_token, c.moe_ffn_hidden_size
        saved += [c.num_routed_experts * 4, k * h * lin]  # FP32 router scores; the k dispatched copies
        saved += [(k + c.num_shared_experts) * 2 * ffn * lin]  # SwiGLU inputs (gates folded into SwiGLU)
        if keep_norm_and_up:
            saved.append((k + c.num_shared_experts) * ffn * lin)
    else:
        saved.append(2 * c.dense_ffn_hidden_size * lin)
        if keep_norm_and_up:
            saved.append(c.dense_ffn_hidden_size * lin)
    return sum(saved)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes of the most loaded rank."""

    params: float
    grads: float
    optimizer: float
    activations: float
    reserve: float
    params_per_rank: float
    micro_batches_in_flight: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.reserve

    def describe(self, capacity_gib: float | None = None) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.1f}"
                          for name in ("params", "grads", "optimizer", "activations", "reserve"))
        cap = f" of {capacity_gib:g} GiB" if capacity_gib else ""
        return f"{self.total / GIB:.1f} GiB{cap} per GPU ({parts} GiB; {self.params_per_rank / 1e9:.2f}B params per rank)"


def estimate_memory(c: DSV3Config, layout: ParallelLayout, schedule: Schedule, train, reserve_gib: float = 0.0,
                    distributed_optimizer: bool = True) -> MemoryEstimate:
    """Per-GPU memory of `c` trained under `layout` and `schedule` with the run's `train:` section
    (`run_config.TrainSection`). Parameters: the schedule's copies of the model over the pipeline
    ranks. Activations: the micro-batches its busiest rank holds (1F1B: PP on the first stage;
    DualPipe: PP + 1 chunks, DualPipeV: 2PP + 1 chunks of half the layers), each having passed one
    model stage of its cut."""
    recompute, fp8 = train.recompute, train.fp8 != "none"
    mixed = train.param_dtype == "bfloat16"  # BF16 weights + FP32 masters
    counts = count_params(c)
    tp, pp = layout.tensor, layout.pipeline
    copies = schedule.model_copies
    model_all = counts.total + c.mtp_num_modules * counts.mtp_module
    routed = counts.routed_all / (layout.expert * tp) * copies / pp
    shared = (model_all - counts.routed_all) / tp * copies / pp
    per_rank = routed + shared
    weight_bytes = 2 if mixed else 4
    moment_bytes = 2 * (2 if train.bf16_adam_moments else 4)
    state_bytes = moment_bytes + (4 if mixed else 0)  # + FP32 master copy under mixed precision
    expert_shards, dense_shards = (layout.expert_data, layout.data) if distributed_optimizer else (1, 1)
    optimizer = state_bytes * (routed / expert_shards + shared / dense_shards)

    tokens = train.seq_length * train.micro_batch_size
    layers = c.num_layers + c.mtp_num_modules
    micro_batches = max(1, train.global_batch_size // (train.micro_batch_size * layout.data))
    held = schedule.micro_batches_held(pp, micro_batches)
    # each held micro-batch has passed one stage of the schedule's cut (the trainer's): its largest
    share = max(len(r) for r in schedule.stage_cut(c.num_layers, pp)) / c.num_layers
    kinds = [moe for moe, present in ((True, c.num_moe_layers), (False, c.first_k_dense_layers)) if present]
    worst_layer = max(layer_activation_bytes(c, moe, "none" if recompute == "full" else recompute, fp8) for moe in kinds)
    if recompute == "full":
        per_token = held * layers * share * c.hidden_size * 2 + worst_layer  # layer inputs + one layer recomputed
    else:
        per_token = held * layers * share * worst_layer
    logits = (1 + c.mtp_num_modules) * c.vocab_size * 4  # FP32 logits of the main and MTP heads
    activations = tokens * (per_token + logits) / tp
    return MemoryEstimate(params=weight_bytes * per_rank, grads=4 * per_rank, optimizer=optimizer,
                          activations=activations, reserve=reserve_gib * GIB, params_per_rank=per_rank,
                          micro_batches_in_flight=held)
