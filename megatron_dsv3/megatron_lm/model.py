"""The model chunks `pretrain_dsv3.py` gives Megatron-LM's `get_model`: Megatron's `GPTModel`
around this project's specs (MLA, DeepSeekMoE, MTP), one chunk per model stage this rank holds.

Which stages a rank holds (its schedule descriptor's `rank_stages`), in chunk order:
  1f1b         stage r on pipeline rank r (Megatron's own placement)
  interleaved  stages v*PP + r, v < virtual stages (Megatron's own placement)
  dualpipev    stages r and 2PP-1-r: the V, so rank 0 holds the first and the last stage
  dualpipe     stages r and PP-1-r: every stage on two ranks, the two copies' gradients summed
               (report section 3.2.1); chunk 0 is the lower stage (`dual_chunk_stages`)

Megatron's `get_model` asks for virtual-pipeline chunk v of rank r and would place model stage
v*PP + r there. For the dual schedules the builder answers with stage `dual_chunk_stages(...)[v]`
instead, and tells Megatron-Core where that stage's layers sit through
`config.pipeline_model_parallel_layout` (`DualPipeLayout`): the layer offset of a chunk is the
first layer of its model stage, so layer numbers, checkpoints' layer keys and the MoE trackers
are those of the whole model, and the embedding, loss and MTP sit where DualPipe puts them.

Every chunk's weights are drawn per parameter from a generator keyed by the seed and the
parameter's whole-model name (`initialize_weights`), so a model has the same weights whatever
the pipeline layout, and DualPipe's two copies of a stage start equal.
"""
from __future__ import annotations

import functools
import zlib
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
from megatron.core.utils import get_attr_wrapped_model

from megatron_dsv3.compat.megatron_api import mtp_layer_attribute

from megatron_dsv3.mcore.specs import check_mtp_layers, get_dsv3_decoder_block_spec, get_dsv3_mtp_block_spec
from megatron_dsv3.megatron_lm.arguments import dual
from megatron_dsv3.pipeline.schedule import get as get_schedule


class PlacementError(RuntimeError):
    """Model chunks that are not where the pipeline schedule needs them; the message says which."""


def stage_types(schedule: str, num_layers: int, pipeline: int, mtp_layers: int, stage: int) -> list[LayerType]:
    """What model stage `stage` holds, as Megatron's layout names it: the embedding on stage 0; the
    decoder layers of `stage_cut`; the MTP layers and the loss on the last stage."""
    cut = get_schedule(schedule).stage_cut(num_layers, pipeline)
    last = len(cut) - 1
    return ([LayerType.embedding] * (stage == 0) + [LayerType.decoder] * len(cut[stage])
            + [LayerType.mtp] * (mtp_layers * (stage == last)) + [LayerType.loss] * (stage == last))


def dual_chunk_stages(schedule: str, pipeline: int, rank: int) -> tuple[int, ...]:
    """The model stages of pipeline rank `rank`'s two chunks under a dual schedule, in Megatron's
    virtual-chunk order: `rank_stages`, lower stage first. Megatron-Core builds MTP only in a rank's
    last virtual chunk (MultiTokenPredictionBlock asserts it), and the last stage, which holds MTP,
    is the higher of its ranks' two: for DualPipe's ranks >= PP/2 this is the reverse of
    `rank_stages` (stage PP-1-r, then r)."""
    return tuple(sorted(get_schedule(schedule).rank_stages(pipeline, rank)))


class DualPipeLayout(PipelineParallelLayerLayout):
    """Megatron-Core's custom pipeline layout, with the dual schedules' placement: virtual chunk v of
    pipeline rank r holds model stage `dual_chunk_stages(schedule, PP, r)[v]`, and a chunk's layer offset
    is where its stage starts in the whole model (Megatron's own layout counts stages in placement
    order, v*PP + r). `rank`: this process's pipeline rank (the default of every query)."""

    def __init__(self, schedule: str, num_layers: int, pipeline: int, mtp_layers: int, rank: int):
        if dual(schedule) is None:
            raise ValueError(f"DualPipeLayout is for schedules of two chunks per rank, not {schedule!r}")
        self.schedule, self.num_layers, self.mtp_layers, self.rank = schedule, num_layers, mtp_layers, rank
        self.stage_layout = [stage_types(schedule, num_layers, pipeline, mtp_layers, s)
                             for s in range(get_schedule(schedule).num_stages(pipeline))]
        # Megatron's constructor takes the flattened per-(vp, pp) list: index v * PP + r.
        placed = [self.stage_layout[dual_chunk_stages(schedule, pipeline, r)[v]] for v in range(2) for r in range(pipeline)]
        super().__init__(placed, pipeline)

    def __repr__(self) -> str:
        return f"DualPipeLayout({self.schedule}, layers={self.num_layers}, PP={self.pipeline_model_parallel_size})"

    def stage(self, vp_stage: Optional[int], pp_rank: Optional[int] = None) -> int:
        """The model stage of virtual chunk `vp_stage` on pipeline rank `pp_rank`."""
        rank = self.rank if pp_rank is None else pp_rank
        return dual_chunk_stages(self.schedule, self.pipeline_model_parallel_size, rank)[vp_stage or 0]

    def get_num_layers_to_build(self, layer_type: LayerType = LayerType.decoder, vp_stage: Optional[int] = None,
                                pp_rank: Optional[int] = None) -> int:
        return self.stage_layout[self.stage(vp_stage, pp_rank)].count(layer_type)

    def get_layer_offset(self, layer_type: LayerType = LayerType.decoder, vp_stage: Optional[int] = None,
                         pp_rank: Optional[int] = None) -> int:
        return sum(types.count(layer_type) for types in self.stage_layout[:self.stage(vp_stage, pp_rank)])


def padded_vocab_size(args: Any) -> int:
    """The embedding rows: Megatron-LM's own padding of the tokenizer's vocabulary (0.16 stores it in
    args.padded_vocab_size; later releases compute it when the model is built)."""
    if getattr(args, "padded_vocab_size", None) is not None:
        return args.padded_vocab_size
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-args.vocab_size // multiple) * multiple


# 0.19's `--yarn-*` flags (argparse dest -> MLATransformerConfig field). Megatron-LM applies them
# only to non-MLA models (argument_utils._apply_yarn_config_from_args returns early for MLA).
YARN_FLAG_FIELDS = {"yarn_original_max_position_embeddings": "original_max_position_embeddings",
                    "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}


def transformer_config(args: Any) -> Any:
    """Megatron-LM's MLATransformerConfig from its arguments, with the `--yarn-*` flags honoured."""
    from megatron.training.arguments import core_transformer_config_from_args  # here: see _megatron_args

    config = core_transformer_config_from_args(args)
    for dest, field in YARN_FLAG_FIELDS.items():
        if getattr(args, dest, None) is not None:
            setattr(config, field, getattr(args, dest))
    return config


def chunk_stage(args: Any, pp_rank: int, vp_stage: Optional[int]) -> int:
    """The model stage Megatron asks for as (pipeline rank, virtual chunk): Megatron's own placement
    v*PP + r, or the dual schedules' (`dual_chunk_stages`)."""
    pipeline = args.pipeline_model_parallel_size
    if dual(args.pipeline_schedule) is not None:
        return dual_chunk_stages(args.pipeline_schedule, pipeline, pp_rank)[vp_stage or 0]
    return (vp_stage or 0) * pipeline + pp_rank


def total_stages(args: Any) -> int:
    """Model stages of the whole pipeline."""
    schedule = dual(args.pipeline_schedule)
    if schedule is not None:
        return schedule.num_stages(args.pipeline_model_parallel_size)
    return args.pipeline_model_parallel_size * (args.virtual_pipeline_model_parallel_size or 1)


class ChunkBuilder:
    """Megatron-LM's `model_provider` for DeepSeek-V3. Megatron's get_model calls it once per chunk
    of this rank, in chunk order, after parsing the arguments (`args`: Megatron-LM's, read with
    `get_args()` when not given); the builder keeps the chunks it built, checks their placement
    (`check_placement`) when the last one is done, before any step runs, and prints what each
    chunk holds."""

    def __init__(self, args: Any = None) -> None:
        self.args = args
        self.built: list[GPTModel] = []

    def __call__(self, pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                 config: Any = None, pg_collection: Any = None) -> GPTModel:
        args = self.args if self.args is not None else _megatron_args()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        config = config if config is not None else transformer_config(args)
        stage, stages = chunk_stage(args, pp_rank, vp_stage), total_stages(args)
        if dual(args.pipeline_schedule) is not None:
            config.pipeline_model_parallel_layout = DualPipeLayout(
                args.pipeline_schedule, config.num_layers, args.pipeline_model_parallel_size,
                config.mtp_num_layers or 0, pp_rank)
            pre_process, post_process = stage == 0, stage == stages - 1
        model = GPTModel(
            config=config, transformer_layer_spec=get_dsv3_decoder_block_spec(config, vp_stage=vp_stage),
            mtp_block_spec=get_dsv3_mtp_block_spec(config, vp_stage=vp_stage),
            vocab_size=padded_vocab_size(args), max_sequence_length=args.max_position_embeddings,
            pre_process=pre_process, post_process=post_process, fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
            parallel_output=True, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
            rotary_base=args.rotary_base, vp_stage=vp_stage, pg_collection=pg_collection)
        model.stage = stage  # the model stage it runs: dualpipe.in_stage_order reads it
        check_mtp_layers(model)
        initialize_weights(model, args.seed)
        schedule = dual(args.pipeline_schedule)
        if schedule is not None and schedule.model_copies == 2 and pp_rank >= args.pipeline_model_parallel_size // 2:
            for param in model.parameters():  # the second copy of its stage: left out of Megatron's grad norm
                param.shared = True
            saved_by_first_copy(model)
        self.built.append(model)
        if len(self.built) == (args.virtual_pipeline_model_parallel_size or 1):
            check_placement(self.built, args.pipeline_schedule, args.pipeline_model_parallel_size, pp_rank)
            if parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
                for index, chunk in enumerate(self.built):
                    print(f"> megatron_dsv3: pipeline rank {pp_rank}, chunk {index}: {summary(chunk, stages)}",
                          flush=True)
        return model


def saved_by_first_copy(model: GPTModel) -> None:
    """Make DualPipe's second copy of a stage (pipeline ranks >= PP/2) a replica that is not the main
    one in Megatron's distributed checkpoints: its sharded tensors (and the optimizer states made
    from them) have the first copy's keys, offsets and values, and Megatron saves each tensor from
    its main replica alone, so only the first copy claims it. Loading gives both copies the tensor."""
    build = model.sharded_state_dict

    @functools.wraps(build)
    def sharded_state_dict(*args: Any, **kwargs: Any) -> dict:
        state = build(*args, **kwargs)
        for item in nested_values(state):
            if isinstance(item, (ShardedTensor, ShardedObject, ShardedTensorFactory)):
                replica = item.replica_id
                item.replica_id = replica + 1 if isinstance(replica, int) else (replica[0] + 1, *replica[1:])
        return state

    model.sharded_state_dict = sharded_state_dict


def _megatron_args() -> Any:
    # Imported here: megatron.training comes with Megatron-LM (the 0.17+ wheels, or a checkout), and
    # the chunks can be built without it when the arguments are given.
    from megatron.training import get_args

    return get_args()


def whole_model_name(model: GPTModel, name: str) -> str:
    """A chunk's parameter name as the whole (unpipelined) model names it: decoder layer i of the
    chunk is layer `layer_number - 1` of the model."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


@torch.no_grad()
def initialize_weights(model: GPTModel, seed: int) -> None:
    """Redraw every matrix of `model` with its config's init method (DeepSeek-V3: N(0, init_method_std)),
    from a generator keyed by `seed` and the parameter's whole-model name, so the weights do not
    depend on how the model is cut into pipeline stages, on which rank builds them, or on the
    expert-parallel size (each routed expert is drawn on its own, keyed by its global index).
    Norm weights (ones) and buffers are left as built. Tensor-parallel shards are drawn per shard
    (their rank joins the key)."""
    config = model.config
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        key = whole_model_name(model, name)
        init = (getattr(config, "embedding_init_method", None) if name.startswith("embedding.") else None) \
            or config.init_method
        value = torch.empty(param.shape, dtype=torch.float32)
        if getattr(param, "expert_parallel", False):  # [local experts, ...]: expert e is global e0 + e
            first = parallel_state.get_expert_model_parallel_rank() * param.shape[0]
            for expert in range(param.shape[0]):
                _draw(value[expert], init, seed, f"{key}[{first + expert}]")
        else:
            if getattr(param, "tensor_model_parallel", False):
                key += f"@tp{parallel_state.get_tensor_model_parallel_rank()}"
            _draw(value, init, seed, key)
        param.copy_(value)


def _draw(tensor: torch.Tensor, init: Any, seed: int, key: str) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
        init(tensor)


def describe(model: GPTModel) -> dict[str, Any]:
    """What a chunk holds: its model stage, whether it embeds / computes the loss / runs MTP, and
    its decoder layers (1-based numbers of the whole model)."""
    return {"stage": getattr(model, "stage", None), "embedding": bool(model.pre_process),
            "loss": bool(model.post_process), "mtp": bool(getattr(model, "mtp_process", False)),
            "layers": [layer.layer_number for layer in model.decoder.layers]}


def summary(model: GPTModel, stages: int) -> str:
    """One line: the chunk's stage, decoder layers, ends, and the classes its MTP layers are made of."""
    held = describe(model)
    parts = [f"model stage {held['stage']} of {stages}", f"decoder layers {held['layers']}"]
    parts += [name for name in ("embedding", "loss") if held[name]]
    if held["mtp"]:
        inner = [getattr(layer, mtp_layer_attribute()) for layer in model.mtp.layers]
        parts.append("MTP " + ", ".join(f"{type(i.self_attention).__name__} + {type(i.mlp).__name__}" for i in inner))
    return "; ".join(parts)


def expected(schedule: str, num_layers: int, pipeline: int, mtp_layers: int, rank: int) -> list[dict[str, Any]]:
    """`describe` of the chunks pipeline rank `rank` must hold under a dual schedule, in chunk order."""
    cut = get_schedule(schedule).stage_cut(num_layers, pipeline)
    last = len(cut) - 1
    return [{"stage": s, "embedding": s == 0, "loss": s == last, "mtp": bool(mtp_layers) and s == last,
             "layers": [i + 1 for i in cut[s]]} for s in dual_chunk_stages(schedule, pipeline, rank)]


def check_placement(chunks: list, schedule: str, pipeline: int, rank: int) -> None:
    """Refuse, naming the chunk and what differs, chunks that are not the stages `schedule` needs on
    pipeline rank `rank` in its order: under the dual schedules the V (or the mirrored pair), each
    stage's layers, and the embedding, loss and MTP on the first and last stage; under Megatron's
    own schedules, the order of the stages and where the ends are (Megatron cuts the layers)."""
    models = [get_attr_wrapped_model(c, "pre_process", return_model_obj=True) for c in chunks]
    config = models[0].config
    if dual(schedule) is not None:
        want = expected(schedule, config.num_layers, pipeline, config.mtp_num_layers or 0, rank)
    else:
        last = pipeline * len(models) - 1
        want = [{"stage": s, "embedding": s == 0, "loss": s == last, "mtp": bool(config.mtp_num_layers) and s == last}
                for s in (v * pipeline + rank for v in range(len(models)))]
    if len(models) != len(want):
        raise PlacementError(f"{schedule}: pipeline rank {rank} holds {len(models)} model chunks, needs "
                             f"{len(want)} (stages {[w['stage'] for w in want]})")
    for index, (model, wanted) in enumerate(zip(models, want)):
        got = describe(model)
        if any(got[key] != wanted[key] for key in wanted):
            raise PlacementError(f"{schedule}: pipeline rank {rank}, model chunk {index} holds {_held(got, wanted)}; "
                                 f"{schedule} needs {_held(wanted, wanted)} there")


def _held(held: dict[str, Any], keys: dict[str, Any]) -> str:
    parts = [f"decoder layers {held['layers']}"] if "layers" in keys else []
    parts += [name for name in ("embedding", "loss", "mtp") if held[name]]
    return f"stage {held['stage']} ({', '.join(parts) or 'no ends'})"
