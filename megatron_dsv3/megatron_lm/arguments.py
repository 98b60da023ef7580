"""The flags `pretrain_dsv3.py` adds to Megatron-LM's parser, and the defaults it gives Megatron's.

    --pipeline-schedule {1f1b,interleaved,dualpipe,dualpipev}
    --dsv3-preset NAME      DeepSeek-V3's architecture flags from a preset (`DSV3Config.preset`)

Both are read once before Megatron parses (`early_choices`), because they decide defaults of
Megatron's own flags: a preset sets the architecture flags (`preset_flags`), a dual schedule two
model chunks per rank, a machine without CUDA `compat.megatron_training_cpu.CPU_FLAGS`. These
become the parser's defaults, so a flag on the command line always wins over them.
"""
from __future__ import annotations

import argparse
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_dsv3.compat.megatron_training_cpu import CPU_FLAGS
from megatron_dsv3 import registry
from megatron_dsv3.config import DSV3Config
from megatron_dsv3.mcore.config import megatron_config_from_dsv3
from megatron_dsv3.pipeline.schedule import ONE_F_ONE_B, Schedule, ScheduleRefused, get as get_schedule

INTERLEAVED = "interleaved"  # Megatron-Core's own interleaved 1F1B (virtual pipeline): not a registered schedule


def schedule_choices() -> list[str]:
    """--pipeline-schedule's values: every registered schedule that runs (has an executor), and Megatron's
    interleaved 1F1B."""
    runnable = [name for name in registry.names("schedule") if get_schedule(name).executor is not None]
    return [ONE_F_ONE_B.name, INTERLEAVED] + [name for name in runnable if name != ONE_F_ONE_B.name]


def dual(name: str) -> Optional[Schedule]:
    """The descriptor of `name` when it holds two model chunks per rank (DualPipe, DualPipeV), else None."""
    if name == INTERLEAVED or name not in registry.names("schedule"):
        return None
    schedule = get_schedule(name)
    return schedule if schedule.stages_per_rank == 2 else None

# Defaults every run of the entry point gets: DeepSeek-V3's fixed architecture choices, and
# --no-persist-layer-norm (Megatron-LM's default persist_layer_norm=True is refused by the torch
# LayerNorm Megatron falls back to without Transformer Engine; our RMSNorm does not read it).
FIXED_FLAGS: dict[str, Any] = {
    "normalization": "RMSNorm", "swiglu": True, "add_bias_linear": False, "hidden_dropout": 0.0,
    "attention_dropout": 0.0, "multi_latent_attention": True, "qk_layernorm": True,
    "position_embedding_type": "rope", "untie_embeddings_and_output_weights": True,
    "moe_router_score_function": "sigmoid", "moe_router_dtype": "fp32", "no_persist_layer_norm": True,
}

# Megatron-Core config field -> Megatron-LM's argparse dest, where the names differ.
_DEST_OF_FIELD = {"num_moe_experts": "num_experts"}
# The config fields a preset sets (the rest are FIXED_FLAGS or training choices).
_PRESET_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "layernorm_epsilon", "init_method_std",
    "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rotary_base", "rope_type",
    "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq",
    "moe_router_topk", "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor",
    "moe_router_enable_expert_bias", "moe_router_bias_update_rate", "mtp_num_layers", "mtp_loss_scaling_factor")
# YaRN: flags up to 0.19 carry the factor and the two mscales; 0.19 adds the `--yarn-*` three.
_YARN_FLAGS = {"rotary_scaling_factor": "factor", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
               "yarn_original_max_position_embeddings": "original_max_position_embeddings",
               "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}


class FlagError(ValueError):
    """A command line the entry point refuses; the message names the flag."""


def _early_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    add_flags(parser)
    return parser


def early_choices(argv: Sequence[str]) -> argparse.Namespace:
    """The entry point's own flags, read before Megatron's parser (which also knows them), and
    Megatron's --num-layers, which a preset's layer pattern (first k dense) follows."""
    parser = _early_parser()
    parser.add_argument("--num-layers", type=int, default=None)
    return parser.parse_known_args(list(argv))[0]


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("DeepSeek-V3 (megatron_dsv3)")
    group.add_argument("--pipeline-schedule", choices=schedule_choices(), default=ONE_F_ONE_B.name,
                       help="1f1b: Megatron's 1F1B; interleaved: Megatron's interleaved 1F1B (with "
                            "--num-virtual-stages-per-pipeline-rank); dualpipe / dualpipev: DeepSeek-V3's "
                            "bidirectional schedules (report section 3.2.1), two model chunks per rank")
    group.add_argument("--dsv3-preset", default=None, choices=registry.names("preset"),
                       help="set DeepSeek-V3's architecture flags from this preset (flags given on the "
                            "command line win)")
    return parser


def preset_flags(cfg: DSV3Config) -> dict[str, Any]:
    """Megatron-LM flag defaults (argparse dests) describing `cfg`'s architecture."""
    config = megatron_config_from_dsv3(cfg)
    flags = {_DEST_OF_FIELD.get(name, name): getattr(config, name) for name in _PRESET_FIELDS}
    flags.update(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
                 moe_router_load_balancing_type=[config.moe_router_load_balancing_type],
                 moe_aux_loss_coeff=[config.moe_aux_loss_coeff])
    if cfg.yarn is not None:
        flags.update({dest: getattr(cfg.yarn, field) for dest, field in _YARN_FLAGS.items()})
    return flags


def schedule_flags(schedule: str) -> dict[str, Any]:
    """The Megatron flags a schedule implies: the dual schedules hold two model chunks per rank,
    which Megatron's get_model builds as two virtual-pipeline chunks (placed by `model.py`);
    Megatron's check that PP > 2 without p2p overlap is for its own interleaved schedule."""
    if dual(schedule) is not None:
        return {"num_virtual_stages_per_pipeline_rank": 2, "overlap_p2p_comm": True}
    return {}


def defaults_for(argv: Sequence[str]) -> dict[str, Any]:
    """Every default the entry point gives Megatron's parser for this command line."""
    choices = early_choices(argv)
    flags = dict(FIXED_FLAGS)
    if not torch.cuda.is_available():
        flags.update(CPU_FLAGS)
    if choices.dsv3_preset is not None:
        layers = {} if choices.num_layers is None else {"num_layers": choices.num_layers}
        flags.update(preset_flags(DSV3Config.preset(choices.dsv3_preset, **layers)))
    flags.update(schedule_flags(choices.pipeline_schedule))
    return flags


def extra_args_provider(defaults: dict[str, Any]) -> Callable[[argparse.ArgumentParser], argparse.ArgumentParser]:
    """Megatron's `extra_args_provider`: adds our flags and sets `defaults` on the dests this
    Megatron-LM knows. A preset value with no flag in this release must equal Megatron-Core's own
    default (the YaRN `--yarn-*` flags arrived in 0.19), else the run is refused."""

    def provide(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_flags(parser)
        known = {action.dest for action in parser._actions}
        missing = {dest: value for dest, value in defaults.items() if dest not in known}
        if missing:
            _check_missing_flags(missing)
        parser.set_defaults(**{dest: value for dest, value in defaults.items() if dest in known})
        return parser

    return provide


def _check_missing_flags(missing: dict[str, Any]) -> None:
    for dest, value in missing.items():
        field = dest.removeprefix("yarn_")
        default = getattr(MLATransformerConfig, field, None)
        if default is None or value != default:
            raise FlagError(f"this Megatron-LM has no flag for {dest}={value!r} (its config default is "
                            f"{default!r}); use a release that has it (0.19 for the --yarn-* flags)")
        warnings.warn(f"{dest}: no such flag in this Megatron-LM; its default {default!r} is the value asked for")


def _micro_batch_problems(schedule: Schedule, args: argparse.Namespace) -> list[str]:
    """The schedule's micro-batch rule (`Schedule.micro_batch_rule`) on the micro-batches of a
    training step and, where Megatron-LM evaluates, of an evaluation step."""
    dp = getattr(args, "data_parallel_size", None)
    steps = [("", "--global-batch-size", getattr(args, "global_batch_size", None), "--micro-batch-size",
              getattr(args, "micro_batch_size", None))]
    evaluation = (getattr(args, "eval_global_batch_size", None) or steps[0][2],
                  getattr(args, "eval_micro_batch_size", None) or steps[0][4])  # 0.19's flags; before, training's
    if getattr(args, "eval_iters", 0) and evaluation != (steps[0][2], steps[0][4]):
        steps.append(("evaluation: ", "--eval-global-batch-size", evaluation[0], "--eval-micro-batch-size", evaluation[1]))
    problems = []
    for what, batch_flag, batch, micro_flag, micro in steps:
        if None in (dp, batch, micro):
            continue
        micro_batches = batch // (micro * dp)
        try:
            schedule.check(args.pipeline_model_parallel_size, micro_batches)
        except ScheduleRefused as refused:
            problems.append(f"{what}{refused} ({batch_flag} {batch} / ({micro_flag} {micro} x {dp} data-parallel "
                            f"ranks)); raise {batch_flag} or lower {micro_flag}")
    return problems


def check(args: argparse.Namespace) -> Optional[str]:
    """What the entry point refuses in Megatron's parsed arguments, as one message (or None)."""
    problems = []
    if args.spec is not None:
        problems.append(f"--spec {' '.join(args.spec)}: pretrain_dsv3.py builds DeepSeek-V3 from megatron_dsv3's "
                        "specs itself; leave --spec out")
    pp = args.pipeline_model_parallel_size
    vp = args.virtual_pipeline_model_parallel_size
    if args.pipeline_schedule == INTERLEAVED and vp is None:
        problems.append("--pipeline-schedule interleaved needs --num-virtual-stages-per-pipeline-rank N (N >= 2) "
                        "or --num-layers-per-virtual-pipeline-stage")
    if args.pipeline_schedule == ONE_F_ONE_B.name and vp is not None:
        problems.append(f"--pipeline-schedule 1f1b with {vp} virtual stages per rank: that is Megatron's interleaved "
                        "schedule; say --pipeline-schedule interleaved")
    schedule = dual(args.pipeline_schedule)
    if schedule is not None:
        if pp < 2 or pp % 2 and schedule.model_copies == 2:
            problems.append(f"--pipeline-schedule {args.pipeline_schedule} needs an even "
                            f"--pipeline-model-parallel-size >= 2 (got {pp})")
        if vp != 2:
            problems.append(f"--pipeline-schedule {args.pipeline_schedule} holds two model chunks per rank; "
                            f"leave the virtual-pipeline flags out (got {vp} virtual stages per rank)")
        if args.num_layers < schedule.num_stages(pp):
            problems.append(f"--num-layers {args.num_layers} is fewer than the "
                            f"{schedule.num_stages(pp)} stages of {args.pipeline_schedule} on PP={pp}")
        if getattr(args, "overlap_grad_reduce", False):
            problems.append(f"--overlap-grad-reduce: --pipeline-schedule {args.pipeline_schedule} reduces the "
                            "gradients once after its step (finalize_model_grads); leave the flag out")
        problems += _micro_batch_problems(schedule, args)
    if getattr(args, "yarn_correction_range_round_to_int", None) is False:
        problems.append("--no-yarn-correction-range-round-to-int: DeepSeek-V3's YaRN rounds the correction "
                        "range to whole dimensions (megatron_dsv3.model.rope)")
    return "; ".join(problems) or None
