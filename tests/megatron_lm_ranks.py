"""Ranks of tests/test_megatron_lm.py's checks (run through tests/distributed.py).

`chunks SCHEDULE OUT`: Megatron-Core's process groups with PP=2 and two chunks per rank, then
`megatron_dsv3.megatron_lm.model.ChunkBuilder` builds this rank's two GPTModel chunks of the tiny
DeepSeek-V3 (4 layers, MTP) as Megatron-LM's get_model asks for them (virtual chunk 0, then 1).
Writes OUT/rank-R.pt: what each chunk holds (`describe`), every parameter under its whole-model
name, the refusal `check_placement` gives when the two chunks are passed in the wrong order, and
gradients and router counts before and after the dual schedules' gradient sums.

`builder PATCH OUT` (one rank, megatron-core 0.19): Megatron-LM's GPTModelBuilder
(megatron/training/models/gpt.py) with PATCH applied to a copy of the installed file builds the
tiny model with MTP from `dsv3_layer_spec` and from `dsv3_block_spec`; the installed builder from
`dsv3_layer_spec`. Writes OUT/builder.pt: the classes of each patched build's MTP layer, and the
refusal `check_mtp_layers` gives for the unpatched build.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dsv3 import DSV3Config
from megatron_dsv3.compat.megatron_cpu import cpu_shims
from megatron_dsv3.mcore import megatron_config_from_dsv3
from megatron_dsv3.megatron_lm.model import ChunkBuilder, PlacementError, check_placement, describe, whole_model_name

PIPELINE, LAYERS = 2, 4


def _build(schedule: str) -> list:
    """This rank's two chunks of the tiny model (4 layers, MTP) under `schedule` on PP=2, built as
    Megatron-LM's get_model asks for them (virtual chunk 0, then 1)."""
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=PIPELINE,
                                             virtual_pipeline_model_parallel_size=2,
                                             get_embedding_ranks=lambda ranks: [ranks[0]])
    cfg = DSV3Config.preset("tiny", num_layers=LAYERS, mtp_num_modules=1, mtp_loss_weight=0.3)
    args = SimpleNamespace(pipeline_schedule=schedule, pipeline_model_parallel_size=PIPELINE,
                           virtual_pipeline_model_parallel_size=2, seed=1234, max_position_embeddings=64,
                           padded_vocab_size=cfg.vocab_size, fp16_lm_cross_entropy=False,
                           untie_embeddings_and_output_weights=True, position_embedding_type="rope",
                           rotary_percent=1.0, rotary_base=10000)
    builder = ChunkBuilder(args)
    for vp_stage in range(2):
        config = megatron_config_from_dsv3(cfg, pipeline_model_parallel_size=PIPELINE,
                                           virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                                           use_cpu_initialization=True)
        builder(pre_process=vp_stage == 0, post_process=False, vp_stage=vp_stage, config=config)
    return builder.built


def chunks(schedule: str, out: Path) -> None:
    """Builds the chunks; records what they hold, their weights and the placement refusal; then
    gives them random gradients (in `main_grad`, as Megatron's DDP keeps them) and router token
    counts, and runs the dual schedules' sums around a stand-in for Megatron's finalize_model_grads
    (`megatron_dsv3.megatron_lm.gradients`), recording gradients and counts before and after."""
    from megatron_dsv3.megatron_lm import gradients
    from megatron_dsv3.parallel import groups

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with cpu_shims():
        built = _build(schedule)
        try:
            check_placement(built[::-1], schedule, PIPELINE, parallel_state.get_pipeline_model_parallel_rank())
            refusal = None
        except PlacementError as error:
            refusal = str(error)
        result = {"held": [describe(chunk) for chunk in built], "refusal": refusal,
                  "weights": [{whole_model_name(chunk, name): p.detach().clone() for name, p in chunk.named_parameters()}
                              for chunk in built],
                  "shared": [all(getattr(p, "shared", False) for p in chunk.parameters()) for chunk in built]}

        groups.initialize_mirror_groups(PIPELINE, datetime.timedelta(seconds=60))
        g = torch.Generator().manual_seed(100 + rank)
        for chunk in built:
            for param in chunk.parameters():
                param.main_grad = torch.randn(param.shape, generator=g)
            for module in chunk.modules():
                if hasattr(module, "local_tokens_per_expert"):
                    module.local_tokens_per_expert.copy_(torch.randint(0, 50, module.expert_bias.shape, generator=g))

        def snapshot(when: str) -> None:
            result[f"grads_{when}"] = [{whole_model_name(c, n): p.main_grad.clone() for n, p in c.named_parameters()}
                                       for c in built]
            result[f"load_{when}"] = [{whole_model_name(c, n): m.local_tokens_per_expert.clone()
                                       for n, m in c.named_modules() if hasattr(m, "local_tokens_per_expert")}
                                      for c in built]

        snapshot("before")
        called = []
        gradients.finalize_model_grads(schedule, lambda model, *a, **k: called.append(len(model)))(built)
        snapshot("after")
        result["megatron_called"] = called == [2]
        torch.save(result, out / f"rank-{rank}.pt")
    dist.destroy_process_group()


def builder(patch: Path, out: Path) -> None:
    import importlib.util
    import shutil
    import subprocess

    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.models import gpt as installed

    from megatron_dsv3.compat.megatron_local_spec import local_spec_shims
    from megatron_dsv3.config import ConfigError
    from megatron_dsv3.mcore import specs
    from megatron_dsv3.megatron_lm.model import summary

    copy = out / "megatron" / "training" / "models" / "gpt.py"
    copy.parent.mkdir(parents=True)
    shutil.copy(installed.__file__, copy)
    subprocess.run(["patch", "--batch", "--fuzz=0", "-p1", "-d", str(out), "-i", str(patch)], check=True)
    module_spec = importlib.util.spec_from_file_location("patched_models_gpt", copy)
    patched = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(patched)

    dist.init_process_group("gloo")
    with cpu_shims():
        parallel_state.initialize_model_parallel()
        groups = ProcessGroupCollection.use_mpu_process_groups()
        cfg = DSV3Config.preset("tiny", mtp_num_modules=1, mtp_loss_weight=0.3)

        def model_config(module, spec):
            config = megatron_config_from_dsv3(cfg, use_cpu_initialization=True, transformer_impl="local")
            return module.GPTModelConfig(transformer=config, transformer_layer_spec=spec, vocab_size=cfg.vocab_size,
                                         seq_length=64, position_embedding_type="rope")

        result = {"patched": {}}
        for name in ("dsv3_layer_spec", "dsv3_block_spec"):
            model = patched.GPTModelBuilder(model_config(patched, getattr(specs, name))).build_model(groups)
            specs.check_mtp_layers(model)
            result["patched"][name] = summary(model, 1).split("; MTP ")[1]
        with local_spec_shims():  # Megatron's own MLA without Transformer Engine
            model = installed.GPTModelBuilder(model_config(installed, specs.dsv3_layer_spec)).build_model(groups)
        try:
            specs.check_mtp_layers(model)
            result["unpatched"] = None
        except ConfigError as error:
            result["unpatched"] = str(error)
        torch.save(result, out / "builder.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "chunks":
        chunks(sys.argv[2], Path(sys.argv[3]))
    else:
        builder(Path(sys.argv[2]), Path(sys.argv[3]))
