"""ZeRO-1 through Megatron-Core: its DistributedDataParallel and distributed optimizer.

DeepSeek-V3 trains with ZeRO-1 data parallelism (report section 3.2: the optimizer state is
sharded over data-parallel ranks, next to 16-way pipeline and 64-way expert parallelism), keeping
FP32 master weights and BF16 moments (section 3.3.3). `ZeRO1Optimizer` wraps
this rank's model stage in Megatron's DDP (gradients accumulate in contiguous FP32 buffers and are
reduce-scattered, each rank keeping 1/DP of them) and steps Megatron's DistributedOptimizer: each
data-parallel rank updates its slice of the parameters with Adam, then the slices are all-gathered.
Dense parameters are sharded over the data-parallel group, experts (`allreduce=False`) over the
expert-data-parallel group; Megatron builds one optimizer for each and chains them.

The model marks its parameters in its own terms; `mark_for_megatron` translates them into the
attributes Megatron's gradient-norm and bucketing code reads:
    tensor_parallel_dim set    -> tensor_model_parallel, partition_dim (counted on every TP rank)
    expert_parallel            -> allreduce = False (expert buffers and optimizer), and
                                  tensor_model_parallel: a TP group's ranks hold different experts
    pipeline_copy == 1         -> shared (the last stage's embedding copy is not counted twice)
    mirror_copy == 1           -> shared (DualPipe's second copy of a stage, summed over the mirror group)

Checkpoints: `param_states` gathers each parameter's moments over the data-parallel group into
the shape of this rank's parameter, the layout `LocalOptimizer` uses, so a ZeRO-1 run resumes on
any data-parallel size and under either optimizer. On CPU, `megatron_dsv3.compat.cpu_shims` lets Megatron's
optimizer accept CPU parameters.
"""
from __future__ import annotations

import warnings

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig
from torch import nn

from megatron_dsv3.optim.local import MOMENTS, AdamW, all_reduce_flat
from megatron_dsv3.parallel import comm, groups


def mark_for_megatron(model: nn.Module) -> None:
    for param in model.parameters():
        if getattr(param, "expert_parallel", False):
            # Ranks of one TP group hold different experts (EP spans TP x DP): like Megatron's own
            # expert linears, they count as tensor-parallel in the gradient norm.
            param.allreduce = False
            param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, 0, 1
        elif getattr(param, "tensor_parallel_dim", None) is not None:
            param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, param.tensor_parallel_dim, 1
        if getattr(param, "pipeline_copy", 0) == 1 or getattr(param, "mirror_copy", 0) == 1:
            param.shared = True


def _transformer_engine_available() -> bool:
    try:  # optional dependency (megatron-dsv3[te])
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


class ZeRO1Optimizer:
    """Megatron-Core DDP + DistributedOptimizer behind the interface of `LocalOptimizer`.

    `bf16_params` turns the model's weights to BF16 while the optimizer updates FP32 master copies
    of its slice (report section 3.3.3; Megatron's mixed precision). `bf16_moments` keeps exp_avg
    and exp_avg_sq in BF16 (same section): through Megatron's precision-aware optimizer (Transformer
    Engine's FusedAdam) where TE is installed, else with our AdamW as the inner optimizer.
    `mirror`: DualPipe's group of the two ranks holding the same stages (gradients summed first)."""

    def __init__(self, model: nn.Module, transformer_config: TransformerConfig, lr: float, betas=(0.9, 0.95),
                 weight_decay: float = 0.1, clip_grad: float = 1.0, bf16_moments: bool = False,
                 bf16_params: bool = False, mirror=None):
        self.model, self.weight_decay, self.bf16_params, self.mirror = model, weight_decay, bf16_params, mirror
        mark_for_megatron(model)
        if bf16_params:  # the optimizer keeps FP32 master copies of this rank's slice
            for param in model.parameters():
                param.data = param.data.bfloat16()
        self.ddp = DistributedDataParallel(
            transformer_config,
            DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                          overlap_grad_reduce=False, overlap_param_gather=False),
            model)
        with_te = bf16_moments and _transformer_engine_available()
        precision = dict(use_precision_aware_optimizer=True, exp_avg_dtype=torch.bfloat16,
                         exp_avg_sq_dtype=torch.bfloat16) if with_te else {}
        config = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0],
                                 adam_beta2=betas[1], adam_eps=1e-8, clip_grad=clip_grad, bf16=bf16_params,
                                 params_dtype=torch.bfloat16 if bf16_params else torch.float32,
                                 use_distributed_optimizer=True, **precision)
        self.megatron = get_megatron_optimizer(config, [self.ddp])
        self.shards = list(getattr(self.megatron, "chained_optimizers", [self.megatron]))  # dense, experts
        if bf16_moments and not with_te:
            # Without TE, the inner optimizer that updates this rank's FP32 slices is our AdamW, which
            # keeps its moments in BF16; Megatron reaches it through `.optimizer` only.
            # The slices are views, which torch.optim refuses as parameters; like Megatron, hand the
            # groups over after construction.
            for shard in self.shards:
                adam = AdamW([torch.empty(0, requires_grad=True)], lr=lr, betas=betas, moment_dtype=torch.bfloat16)
                adam.param_groups = shard.optimizer.param_groups
                adam.init_state()
                shard.optimizer = adam
        self.step_count = 0
        self._init_states()

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        with warnings.catch_warnings():  # it reads .grad of its FP32 shard views, which are not leaves
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            self.megatron.zero_grad()

    def step(self, lr: float) -> float:
        """Sum the embedding copies' gradients over the embedding group and DualPipe's two copies'
        over the mirror group, reduce-scatter over data-parallel ranks, clip by the global norm,
        update this rank's slice and all-gather the parameters. Returns the norm before clipping."""
        copies = [p.main_grad for p in self.model.parameters() if getattr(p, "pipeline_copy", None) is not None]
        if copies:  # only the first and last stages are in the embedding group (Megatron asserts elsewhere)
            all_reduce_flat(copies, groups.embedding_group())
        if self.mirror is not None:  # DualPipe's two copies: sum the main gradients where they live,
            for buffer in self.ddp.buffers + self.ddp.expert_parallel_buffers:  # not in a flat copy of them
                comm.all_reduce(buffer.grad_data, self.mirror)
        for group in self.megatron.param_groups:  # what Megatron's OptimizerParamScheduler would set
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)  # 0 for norms
        self.step_count += 1
        with warnings.catch_warnings():  # torch renamed the collectives Megatron calls; said once per call
            warnings.filterwarnings("ignore", message=r".*_tensor` is deprecated", category=FutureWarning)
            self.ddp.finish_grad_sync()
            _, grad_norm, _ = self.megatron.step()
        return float("nan") if grad_norm is None else float(grad_norm)

    # ------------------------------------------------------------------ state
    def _owned(self):
        """(name, shard optimizer, parameter, this rank's range of the flattened parameter or None),
        in the model's parameter order, which every rank of a data-parallel group shares."""
        for name, param in self.model.named_parameters():
            shard = next((s for s in self.shards if any(param in b.param_index_map for b in s.buffers)), None)
            if shard is None:
                raise RuntimeError(f"parameter {name} is in no buffer of Megatron's optimizer")
            owned = None
            if param in shard.model_param_gbuf_map:  # only parameters overlapping this rank's slice
                owned = shard._get_model_param_range_map(param)["param"]
            yield name, shard, param, owned

    def _init_states(self) -> None:
        """Adam state before the first step, so a checkpoint can be loaded into it."""
        for shard in self.shards:
            adam = shard.optimizer
            for group in adam.param_groups:
                for main in group["params"]:
                    if not adam.state[main]:
                        if shard.config.use_precision_aware_optimizer:
                            adam.initialize_state(main)
                        else:
                            adam.state[main].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(main),
                                                    exp_avg_sq=torch.zeros_like(main))

    def state_bytes(self) -> int:
        """Bytes of Adam moments held by this rank: its slice only."""
        return sum(t.numel() * t.element_size() for shard in self.shards for state in shard.optimizer.state.values()
                   for name, t in state.items() if name in MOMENTS)

    @torch.no_grad()
    def _gather(self, keys: tuple[str, ...], empty: bool) -> dict[str, dict[str, torch.Tensor]]:
        """The optimizer tensors `keys` ("exp_avg", "exp_avg_sq", "param": the FP32 main copy) of
        every parameter, whole over the data-parallel group (an all-reduce of the slices, so every
        rank of the group must call it unless `empty`), in FP32, shaped like the parameter."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        per_shard: dict[int, list[torch.Tensor]] = {}
        for name, shard, param, owned in self._owned():
            full = {k: torch.zeros(param.numel(), dtype=torch.float32, device=param.device) for k in keys}
            if owned is not None and not empty:
                local = shard._get_main_param_and_optimizer_states(param)
                for k in keys:
                    full[k][owned.start:owned.end] = local[k].float()
            per_shard.setdefault(id(shard), []).extend(full.values())
            out[name] = {k: t.view(param.shape) for k, t in full.items()}
        if not empty:
            for shard in self.shards:
                all_reduce_flat(per_shard.get(id(shard), []), shard.data_parallel_group)
        return out

    @torch.no_grad()
    def _scatter(self, values: dict[str, dict[str, torch.Tensor]]) -> None:
        """Take this rank's slice of each parameter's given optimizer tensors."""
        for name, shard, param, owned in self._owned():
            if owned is None:
                continue
            local = shard._get_main_param_and_optimizer_states(param)
            for k, value in values[name].items():
                local[k] = value.flatten()[owned.start:owned.end].to(local[k].dtype)
            if "step" in local:
                local["step"] = torch.full_like(local["step"], float(self.step_count))
            shard._set_main_param_and_optimizer_states(param, local)
        for shard in self.shards:
            if isinstance(shard.optimizer, AdamW):
                shard.optimizer.step_count = self.step_count
            for group in shard.optimizer.param_groups:
                if "step" in group:  # Transformer Engine's FusedAdam counts per group
                    group["step"] = self.step_count

    def param_states(self, empty: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Each parameter's Adam moments, whole over the data-parallel group, shaped like it."""
        return self._gather(MOMENTS, empty)

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Take this rank's slice of the moments; the Adam step count comes from `step_count`
        (set it first)."""
        self._scatter({name: {m: states[name][m] for m in MOMENTS} for name in states})

    def master_weights(self, empty: bool = False) -> dict[str, torch.Tensor]:
        """With BF16 weights, their FP32 master copies (whole, shaped like the parameters): what a
        checkpoint stores as the weights. Empty when the weights are FP32 themselves."""
        if not self.bf16_params:
            return {}
        return {name: tensors["param"] for name, tensors in self._gather(("param",), empty).items()}

    def load_master_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if self.bf16_params:
            self._scatter({name: {"param": weights[name]} for name in weights})
