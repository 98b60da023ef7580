"""Megatron-LM's own training loop with DeepSeek-V3: examples/megatron_lm/pretrain_dsv3.py
(`megatron_dsv3.megatron_lm`), and the patches to Megatron-LM's own builders (patches/).

- `pretrain()` runs (needs `megatron.training`: the megatron-core 0.17+ wheels ship it, so CI's
  Python 3.12 leg runs these; the 0.16 wheel does not, and they skip): the tiny DeepSeek-V3 (the
  `tiny` preset's shape, 4 layers, MTP) trains 3 steps with evaluation on 1 rank, and on 2 gloo
  ranks under 1F1B PP2 (with full recompute), Megatron's interleaved schedule (PP2, two chunks
  per rank) and DP2 x EP2 with the distributed optimizer; the logged losses agree within 1e-5,
  and so does the balance loss.
- the dual schedules in `pretrain()` (3.12 leg): DualPipeV and DualPipe on PP2, with MTP and
  evaluation (DualPipe also saving a checkpoint), log the 1-rank run's losses within 1e-5.
- the dual schedules' chunks (both legs): what each rank builds for DualPipeV and DualPipe on
  PP2, the layer numbers, equal weights of every copy, and the refusal of chunks out of order;
  how the executor reads Megatron's per-chunk data and splits a Megatron chunk's backward.
- each patch with `patch --dry-run` against the file it patches: the installed 0.19 wheel's, and with
  MEGATRON_LM_REPO (a clone of Megatron-LM) each release's.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.module import MegatronModule

from helpers.distributed import ROOT, free_port, run_ranks
from megatron_dsv3.megatron_lm import arguments
from megatron_dsv3.megatron_lm.model import DualPipeLayout, dual_chunk_stages, expected, stage_types
from megatron_dsv3.pipeline import get_schedule
from megatron_dsv3.pipeline.dualpipe import InMicroBatchOrder, ModelChunk

HAS_TRAINING = importlib.util.find_spec("megatron.training") is not None
needs_training = pytest.mark.skipif(not HAS_TRAINING, reason=(
    "megatron.training (Megatron-LM's training loop) is not installed: the megatron-core 0.16 wheel ships "
    "megatron.core only (the 0.17+ wheels, on CI's Python 3.12 leg, ship it)"))
MODELS_GPT = "megatron.training.models.gpt"  # 0.19's model builder (0.17 has no megatron.training.models)
MODELS_GPT_PATH = "megatron/training/models/gpt.py"  # in a Megatron-LM tree and in the 0.19 wheels
HAS_MODELS_GPT = HAS_TRAINING and importlib.util.find_spec("megatron.training.models") is not None \
    and importlib.util.find_spec(MODELS_GPT) is not None
ENTRY = "examples/megatron_lm/pretrain_dsv3.py"
PATCHES = ROOT / "patches"
# A git clone of NVIDIA/Megatron-LM with its core_v* tags: the gpt_builders.py the patches change lies at
# the root of a Megatron-LM checkout, which no wheel ships (not copied here: Megatron-LM's code).
MEGATRON_LM_REPO = os.environ.get("MEGATRON_LM_REPO")
TAGS = ("core_v0.16.1", "core_v0.17.1", "core_v0.18.2", "core_v0.19.0")
TINY = ["--dsv3-preset", "tiny", "--num-layers", "4", "--mtp-num-layers", "1", "--seed", "1234",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32", "--train-iters", "3",
        "--lr", "1e-3", "--lr-decay-style", "constant", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1"]
ITERATION = re.compile(r"iteration\s+(\d+)/\s*3 \|(.*)")
VALIDATION = re.compile(r"validation loss at iteration 3 \| lm loss value: (\S+) ")


# ------------------------------------------------------------------ Megatron-LM's pretrain()
def pretrain(world: int, *flags: str) -> tuple[dict[int, dict[str, float]], str]:
    """Run the entry point on `world` gloo ranks; ({iteration: {logged name: value}}, all output)."""
    outputs = run_ranks(world, [ENTRY, *TINY, *flags], timeout=420)
    logged = {}
    for line in "\n".join(outputs).splitlines():
        match = ITERATION.search(line)
        if match:
            fields = (f.split(": ") for f in match.group(2).split(" | ") if ": " in f)
            values = {name.strip(): value for name, value in fields}
            logged[int(match.group(1))] = {name: float(values[name]) for name in
                                           ("lm loss", "mtp_1 loss", "seq_load_balancing_loss", "grad norm")}
    return logged, "\n".join(outputs)


@pytest.fixture(scope="module")
def one_rank():
    return pretrain(1)


def _agree(run: dict, reference: dict, names=("lm loss", "mtp_1 loss", "seq_load_balancing_loss"),
           within: float = 1e-5) -> None:
    assert sorted(run) == sorted(reference) == [1, 2, 3]
    for step in reference:
        for name in names:
            assert abs(run[step][name] - reference[step][name]) <= within, (step, name, run[step], reference[step])


@needs_training
def test_pretrain_trains_evaluates_and_builds_our_mtp(one_rank):
    logged, output = one_rank
    assert sorted(logged) == [1, 2, 3] and logged[3]["lm loss"] < logged[1]["lm loss"]
    assert len(VALIDATION.findall(output)) >= 1  # Megatron's evaluate() ran
    assert "megatron_dsv3: pipeline rank 0, chunk 0: model stage 0 of 1; decoder layers [1, 2, 3, 4]; embedding; " \
           "loss; MTP MegatronMLA + MegatronDeepSeekMoE" in output
    assert "load_balancing_loss: 0" not in output.replace("seq_load_balancing_loss", "")
    assert "Unknown MLP type" not in output


@needs_training
def test_pretrain_pp2_with_full_recompute_logs_the_one_rank_losses(one_rank):
    """1F1B on two pipeline stages, every layer recomputed in backward: the same LM, MTP and balance
    losses as one rank without recompute (the balance loss counted once per micro-batch)."""
    logged, output = pretrain(2, "--pipeline-model-parallel-size", "2", "--recompute-granularity", "full",
                              "--recompute-method", "uniform", "--recompute-num-layers", "1")
    _agree(logged, one_rank[0])
    assert VALIDATION.findall(output)[0] == VALIDATION.findall(one_rank[1])[0]
    assert "pipeline rank 1, chunk 0: model stage 1 of 2; decoder layers [3, 4]; loss; MTP MegatronMLA" in output


@needs_training
def test_pretrain_interleaved_pp2_logs_the_one_rank_losses(one_rank):
    logged, output = pretrain(2, "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "interleaved",
                              "--num-virtual-stages-per-pipeline-rank", "2")
    _agree(logged, one_rank[0])
    assert "pipeline rank 0, chunk 1: model stage 2 of 4; decoder layers [3]" in output
    assert "pipeline rank 1, chunk 1: model stage 3 of 4; decoder layers [4]; loss; MTP" in output


@needs_training
def test_pretrain_dp2_ep2_with_the_distributed_optimizer_logs_the_one_rank_losses(one_rank):
    """Two data-parallel ranks, the routed experts split over them (EP2), Megatron's DDP and
    distributed optimizer: the one-rank losses (expert weights are drawn per global expert, and the
    experts' gradients stay out of the data-parallel reduction: `mark_for_megatron`)."""
    logged, output = pretrain(2, "--expert-model-parallel-size", "2", "--use-distributed-optimizer")
    _agree(logged, one_rank[0])
    assert VALIDATION.findall(output)[0] == VALIDATION.findall(one_rank[1])[0]


EVALUATED = re.compile(r"loss at iteration 3(?: on (?:validation|test) set)? \| lm loss value: (\S+) ")


@needs_training
@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe"])
def test_pretrain_dual_schedules_pp2_with_mtp_and_evaluation_log_the_one_rank_losses(one_rank, schedule, tmp_path):
    """DualPipeV and DualPipe on two pipeline ranks in Megatron-LM's own loop (its DDP, its
    finalize_model_grads with the dual sums, its evaluate() through the forward-only pass): the
    one-rank 1F1B run's LM, MTP and balance losses at every step and its validation and test losses.
    The 1-rank run's global batch of 4 comes as 4 micro-batches of 1 here (the schedules' rule:
    at least 2 x PP). The MTP stage is the plugin's MTP layer, on the ranks where the schedule
    puts the last stage (DualPipeV: rank 0; DualPipe: both). DualPipe also saves a distributed
    checkpoint, where its two copies of each stage must not both claim a tensor."""
    save = ["--save", str(tmp_path), "--save-interval", "3"] if schedule == "dualpipe" else []
    logged, output = pretrain(2, "--pipeline-model-parallel-size", "2", "--pipeline-schedule", schedule,
                              "--micro-batch-size", "1", *save)
    _agree(logged, one_rank[0], names=("grad norm",), within=1.1e-3)  # printed to 3 decimals; DualPipe's copies count once
    if save:
        assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
        assert (tmp_path / "iter_0000003" / "metadata.json").is_file()
    _agree(logged, one_rank[0])
    evaluated, reference = EVALUATED.findall(output), EVALUATED.findall(one_rank[1])
    assert len(evaluated) == len(reference) >= 1
    assert all(abs(float(a) - float(b)) <= 1e-5 for a, b in zip(evaluated, reference)), (evaluated, reference)
    mtp = "loss; MTP MegatronMLA + MegatronDeepSeekMoE"
    if schedule == "dualpipev":
        assert f"pipeline rank 0, chunk 1: model stage 3 of 4; decoder layers [4]; {mtp}" in output
    else:
        for rank in (0, 1):
            assert f"pipeline rank {rank}, chunk 1: model stage 1 of 2; decoder layers [3, 4]; {mtp}" in output


@needs_training
def test_entry_point_refuses_a_spec_flag_in_one_line():
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, ENTRY, *TINY, "--spec", "megatron_dsv3.mcore.specs", "dsv3_layer_spec"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        "pretrain_dsv3.py: --spec megatron_dsv3.mcore.specs dsv3_layer_spec: pretrain_dsv3.py builds DeepSeek-V3 "
        "from megatron_dsv3's specs itself; leave --spec out")


# ------------------------------------------------------------------ the dual schedules' chunks
@pytest.mark.parametrize("schedule,pipeline", [("dualpipev", 4), ("dualpipe", 4), ("dualpipev", 2), ("dualpipe", 2)])
def test_dual_layout_places_each_stage_and_counts_its_layers_in_the_whole_model(schedule, pipeline):
    layers = 13
    cut = get_schedule(schedule).stage_cut(layers, pipeline)
    for rank in range(pipeline):
        layout = DualPipeLayout(schedule, layers, pipeline, mtp_layers=1, rank=rank)
        for vp, stage in enumerate(dual_chunk_stages(schedule, pipeline, rank)):
            assert layout.get_layer_offset(vp_stage=vp) == cut[stage].start
            assert layout.get_num_layers_to_build(vp_stage=vp) == len(cut[stage])
            assert layout.get_layer_id_list(vp_stage=vp) == list(cut[stage])
            assert layout.layout[rank][vp] == stage_types(schedule, layers, pipeline, 1, stage)
    last = len(cut) - 1
    # The embedding, the loss and MTP sit on the first and last stage: both on rank 0 (and its DualPipe mirror).
    holders = {kind: sorted({r for r in range(pipeline) for s in dual_chunk_stages(schedule, pipeline, r)
                             if LayerType[kind] in stage_types(schedule, layers, pipeline, 1, s)})
               for kind in ("embedding", "mtp", "loss")}
    ends = [0] if schedule == "dualpipev" else [0, pipeline - 1]
    assert holders == {"embedding": ends, "mtp": ends, "loss": ends}
    assert expected(schedule, layers, pipeline, 1, 0)[-1] == {
        "stage": last, "embedding": False, "loss": True, "mtp": True, "layers": [i + 1 for i in cut[last]]}


def test_dual_chunk_order_puts_the_mtp_stage_last_as_megatron_requires():
    # DualPipe's ranks >= PP/2 hold (r, PP-1-r) in rank_stages order; Megatron builds MTP only in a
    # rank's last virtual chunk, so their chunks come lower stage first.
    assert dual_chunk_stages("dualpipe", 4, 3) == (0, 3) and dual_chunk_stages("dualpipe", 4, 1) == (1, 2)
    assert dual_chunk_stages("dualpipev", 4, 1) == (1, 6)


@pytest.fixture(scope="module", params=["dualpipev", "dualpipe"])
def dual(request, tmp_path_factory) -> tuple[str, list[dict]]:
    """(schedule, each rank's record from tests/megatron_lm_ranks.py `chunks` on 2 ranks, PP2)."""
    out = tmp_path_factory.mktemp(request.param)
    run_ranks(2, [str(Path(__file__).parent / "megatron_lm_ranks.py"), "chunks", request.param, str(out)], timeout=240)
    return request.param, [torch.load(out / f"rank-{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_dual_chunks_built_for_megatron_get_model(dual):
    """Each rank's two GPTModel chunks hold the stages the schedule needs, with whole-model layer
    numbers; a parameter held by several chunks (DualPipe's copies of a stage, the MTP stage's
    copy of the embedding) starts with the same values in each; chunks out of order are refused."""
    schedule, ranks = dual
    held = [[(c["stage"], c["layers"], c["embedding"], c["loss"], c["mtp"]) for c in r["held"]] for r in ranks]
    if schedule == "dualpipev":  # V: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2; one layer each
        assert held == [[(0, [1], True, False, False), (3, [4], False, True, True)],
                        [(1, [2], False, False, False), (2, [3], False, False, False)]]
    else:  # both ranks hold both stages (lower first), two layers each
        assert held == [[(0, [1, 2], True, False, False), (1, [3, 4], False, True, True)]] * 2
    copies: dict[str, list[torch.Tensor]] = {}
    for rank in ranks:
        for chunk in rank["weights"]:
            for name, tensor in chunk.items():
                copies.setdefault(name, []).append(tensor)
    shared = {name: tensors for name, tensors in copies.items() if len(tensors) > 1}
    assert "embedding.word_embeddings.weight" in shared
    if schedule == "dualpipe":
        assert len(shared) == len(copies)  # every parameter exists twice
    for name, tensors in shared.items():
        for tensor in tensors[1:]:
            assert torch.equal(tensor, tensors[0]), name
    assert ranks[0]["refusal"] == (
        f"{schedule}: pipeline rank 0, model chunk 0 holds stage {held[0][1][0]} (decoder layers {held[0][1][1]}, "
        f"loss, mtp); {schedule} needs stage 0 (decoder layers {held[0][0][1]}, embedding) there")


def test_dual_gradient_sums_around_megatrons_finalize(dual):
    """After Megatron's finalize_model_grads (stood in here), every copy of a parameter holds the sum
    of all its copies' gradients: the MTP stage's embedding copy and the embedding on rank 0, and
    under DualPipe each stage's two copies on the mirror ranks, whose router token counts (the
    expert-bias step's input) are summed first. Other gradients are left alone; DualPipe's second
    copies (rank 1 of PP2) are marked `shared`, outside Megatron's gradient norm."""
    schedule, ranks = dual
    assert all(r["megatron_called"] for r in ranks)
    before: dict[str, list[torch.Tensor]] = {}
    for rank in ranks:
        for chunk in rank["grads_before"]:
            for name, grad in chunk.items():
                before.setdefault(name, []).append(grad)
    for rank in ranks:
        for chunk in rank["grads_after"]:
            for name, grad in chunk.items():
                torch.testing.assert_close(grad, torch.stack(before[name]).sum(dim=0), rtol=1e-6, atol=1e-6)
    copied = {name for name, grads in before.items() if len(grads) > 1}
    assert "embedding.word_embeddings.weight" in copied
    assert (copied == set(before)) == (schedule == "dualpipe")
    for r, rank in enumerate(ranks):
        for c, chunk in enumerate(rank["load_after"]):
            for name, counts in chunk.items():
                mirrored = [other["load_before"][oc][name] for other in ranks for oc in range(2)
                            if name in other["load_before"][oc]]
                assert torch.equal(counts, sum(mirrored) if schedule == "dualpipe" else rank["load_before"][c][name])
    assert [r["shared"] for r in ranks] == ([[False, False], [True, True]] if schedule == "dualpipe" else
                                            [[False, False], [False, False]])


def test_each_chunk_reads_megatrons_iterator_in_the_order_it_runs_its_micro_batches():
    """Megatron's iterator of a chunk yields the step's micro-batches 0..3; a DualPipe stage of the
    second direction runs 2 and 3: it gets those, and the next step starts at the next step's first.
    A chunk that reads nothing (a middle stage) leaves its iterator alone."""
    batches = iter(range(10))
    second_direction = InMicroBatchOrder(batches, [2, 3], 4)
    assert list(second_direction) == [2, 3]
    second_direction.finish()
    first_direction = InMicroBatchOrder(batches, [1, 0], 4)
    assert [next(first_direction), next(first_direction)] == [5, 4]
    first_direction.finish()
    untouched = InMicroBatchOrder(batches, [0, 1], 4)
    untouched.finish()
    assert list(batches) == [8, 9]


def _chunk(megatron: bool) -> torch.nn.Module:
    """A model chunk without this project's deferrable GEMMs: a Megatron-Core model or a plain module."""
    base = MegatronModule if megatron else torch.nn.Module

    class Chunk(base):
        def __init__(self):
            super().__init__(*[TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)] * megatron)
            self.linear = torch.nn.Linear(4, 4)

        def set_input_tensor(self, tensors):
            pass

        def forward(self, x):
            return self.linear(x).square().sum()

    return Chunk()


@pytest.mark.parametrize("megatron", [True, False])
def test_dual_executor_splits_a_megatron_chunk_not_in_b_and_w(megatron):
    """B (the input gradient) and W (the weight gradient) of a chunk with none of this project's
    deferrable GEMMs: a Megatron-Core model (whose fused cross-entropy and gradient-accumulation
    fusion must see one backward) gets its whole backward in B, any other module its weight
    gradient in W from a retained graph; both end with the plain backward's gradient."""
    chunk, x = _chunk(megatron), torch.randn(2, 4)
    chunk(x).backward()
    expected, chunk.linear.weight.grad = chunk.linear.weight.grad.clone(), None
    step = lambda data, model: (model(next(data)), lambda out: (out, {"loss": out.detach()}))  # noqa: E731
    runner = ModelChunk(chunk, 0, 1, step, iter([x]), 1)
    runner.forward(0, None)
    runner.backward(0, None, split=True)
    assert (chunk.linear.weight.grad is not None) == megatron
    runner.weight_grad(0)
    torch.testing.assert_close(chunk.linear.weight.grad, expected)


# ------------------------------------------------------------------ the entry point's flags
def test_preset_flags_describe_the_preset_as_megatron_lm_flags():
    flags = arguments.preset_flags(__import__("megatron_dsv3").DSV3Config.preset("tiny", num_layers=4))
    assert flags["num_layers"] == 4 and flags["moe_layer_freq"] == [0, 1, 1, 1]
    assert flags["num_experts"] == 8 and flags["moe_router_group_topk"] == 2 and flags["q_lora_rank"] == 64
    assert flags["moe_router_load_balancing_type"] == ["seq_aux_loss"] and flags["vocab_size"] == 320


def test_schedule_defaults_and_refusals():
    defaults = arguments.defaults_for(["--pipeline-schedule", "dualpipev", "--dsv3-preset", "tiny", "--num-layers", "8"])
    assert defaults["num_virtual_stages_per_pipeline_rank"] == 2 and defaults["num_layers"] == 8
    assert defaults["no_persist_layer_norm"] is True

    def args(**changes):
        values = dict(spec=None, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=None,
                      pipeline_schedule="1f1b", num_layers=4, yarn_correction_range_round_to_int=None)
        return __import__("types").SimpleNamespace(**{**values, **changes})

    assert arguments.check(args()) is None
    assert arguments.check(args(pipeline_schedule="dualpipev", virtual_pipeline_model_parallel_size=2)) is None
    assert "needs --num-virtual-stages-per-pipeline-rank" in arguments.check(args(pipeline_schedule="interleaved"))
    assert "that is Megatron's interleaved schedule" in arguments.check(args(virtual_pipeline_model_parallel_size=2))
    assert "even --pipeline-model-parallel-size >= 2 (got 3)" in arguments.check(
        args(pipeline_schedule="dualpipe", pipeline_model_parallel_size=3, virtual_pipeline_model_parallel_size=2))
    assert "fewer than the 4 stages" in arguments.check(
        args(pipeline_schedule="dualpipev", num_layers=3, virtual_pipeline_model_parallel_size=2))
    assert "--spec a b: pretrain_dsv3.py builds" in arguments.check(args(spec=["a", "b"]))
    dual_pp2 = dict(pipeline_schedule="dualpipe", virtual_pipeline_model_parallel_size=2, data_parallel_size=1)
    assert arguments.check(args(**dual_pp2, overlap_grad_reduce=True)) == (
        "--overlap-grad-reduce: --pipeline-schedule dualpipe reduces the gradients once after its step "
        "(finalize_model_grads); leave the flag out")
    assert arguments.check(args(**dual_pp2, global_batch_size=8, micro_batch_size=2)) is None
    assert arguments.check(args(**dual_pp2, global_batch_size=4, micro_batch_size=2)) == (
        "dualpipe needs at least 2 x PP = 4 micro-batches per step, got 2 (--global-batch-size 4 / "
        "(--micro-batch-size 2 x 1 data-parallel ranks)); raise --global-batch-size or lower --micro-batch-size")
    assert arguments.check(args(**dual_pp2, global_batch_size=8, micro_batch_size=2, eval_iters=1,
                                eval_global_batch_size=10, eval_micro_batch_size=2)) == (
        "evaluation: dualpipe needs an even number of micro-batches per step, got 5 (--eval-global-batch-size 10 / "
        "(--eval-micro-batch-size 2 x 1 data-parallel ranks)); raise --eval-global-batch-size or lower "
        "--eval-micro-batch-size")
    assert "rounds the correction range" in arguments.check(args(yarn_correction_range_round_to_int=False))


@needs_training
def test_yarn_flags_of_megatron_lm_0_19_reach_mla(monkeypatch):
    """0.19's --yarn-original-max-position-embeddings / --yarn-beta-fast / --yarn-beta-slow, which
    Megatron-LM applies only to non-MLA models, set MLA's YaRN here; not rounding the correction
    range is refused."""
    from megatron.training.arguments import parse_args, validate_args

    from megatron_dsv3.mcore.config import dsv3_config_from_megatron
    from megatron_dsv3.megatron_lm.model import transformer_config

    argv = ["--dsv3-preset", "tiny", "--rope-type", "yarn", "--rotary-scaling-factor", "40",
            "--yarn-original-max-position-embeddings", "2048", "--yarn-beta-fast", "16", "--yarn-beta-slow", "2",
            "--micro-batch-size", "1", "--seq-length", "32", "--tokenizer-type", "NullTokenizer"]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["pretrain_dsv3.py", *argv])
    args = parse_args(arguments.extra_args_provider(arguments.defaults_for(argv)))
    if not hasattr(args, "yarn_beta_fast"):
        pytest.skip("this Megatron-LM has no --yarn-* flags (they arrived in 0.19)")
    validate_args(args, {})
    yarn = dsv3_config_from_megatron(transformer_config(args)).yarn
    assert (yarn.factor, yarn.original_max_position_embeddings, yarn.beta_fast, yarn.beta_slow) == (40, 2048, 16, 2)
    args.yarn_correction_range_round_to_int = False
    assert "rounds the correction range" in arguments.check(args)


# ------------------------------------------------------------------ patches/
def dry_run(patch: Path, directory: Path) -> bool:
    """Whether `patch` applies exactly (no fuzz) in `directory` (a Megatron-LM tree), changing nothing."""
    proc = subprocess.run(["patch", "--dry-run", "--batch", "--fuzz=0", "-p1", "-d", str(directory), "-i", str(patch)],
                          capture_output=True, text=True)
    return proc.returncode == 0


GPT_BUILDERS = {"megatron-lm-0.16-0.17-gpt_builders-spec-mtp.patch": ("core_v0.16.1", "core_v0.17.1"),
                "megatron-lm-0.18-gpt_builders-spec-mtp.patch": ("core_v0.18.2",)}


def tag_tree(tag: str, paths: tuple[str, ...], into: Path) -> Path:
    """`paths` of Megatron-LM at `tag`, from the MEGATRON_LM_REPO clone, in a folder under `into`
    (a file the tag lacks is left out)."""
    tree = into / tag
    for path in paths:
        shown = subprocess.run(["git", "-C", MEGATRON_LM_REPO, "show", f"{tag}:{path}"], capture_output=True)
        if shown.returncode == 0:
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            (tree / path).write_bytes(shown.stdout)
    tree.mkdir(parents=True, exist_ok=True)
    return tree


needs_megatron_lm_repo = pytest.mark.skipif(not MEGATRON_LM_REPO, reason=(
    "set MEGATRON_LM_REPO to a git clone of NVIDIA/Megatron-LM with its core_v0.16-0.19 tags: the files "
    "these patches change are not in any wheel"))


@pytest.mark.skipif(shutil.which("patch") is None, reason="GNU patch is not installed")
@needs_megatron_lm_repo
@pytest.mark.parametrize("name", sorted(GPT_BUILDERS))
def test_gpt_builders_patch_applies_to_the_releases_it_names_only(name, tmp_path):
    applies = {tag: dry_run(PATCHES / name, tag_tree(tag, ("gpt_builders.py",), tmp_path)) for tag in TAGS}
    assert applies == {tag: tag in GPT_BUILDERS[name] for tag in TAGS}


@pytest.mark.skipif(shutil.which("patch") is None, reason="GNU patch is not installed")
@needs_megatron_lm_repo
def test_models_gpt_patch_applies_to_the_release_it_names_only(tmp_path):
    patch = PATCHES / "megatron-lm-0.19-models_gpt-spec-mtp.patch"
    applies = {tag: dry_run(patch, tag_tree(tag, (MODELS_GPT_PATH,), tmp_path)) for tag in TAGS}
    assert applies == {tag: tag == "core_v0.19.0" for tag in TAGS}


@pytest.mark.skipif(shutil.which("patch") is None, reason="GNU patch is not installed")
@pytest.mark.skipif(not HAS_MODELS_GPT, reason=(
    "megatron/training/models/gpt.py is not installed (megatron-core < 0.19): the 0.19 patch is checked "
    "on the Python 3.12 leg, where it is"))
def test_models_gpt_patch_applies_to_the_installed_megatron_training():
    patch = PATCHES / "megatron-lm-0.19-models_gpt-spec-mtp.patch"
    site = Path(importlib.util.find_spec(MODELS_GPT).origin).parents[3]
    assert dry_run(patch, site)


@pytest.mark.skipif(not HAS_MODELS_GPT,
                    reason="megatron/training/models/gpt.py is not installed (megatron-core < 0.19)")
@pytest.mark.skipif(shutil.which("patch") is None, reason="GNU patch is not installed")
def test_patched_models_gpt_builds_our_mtp_from_either_spec(tmp_path):
    """Megatron-LM 0.19's GPTModelBuilder, with the patch applied to a copy of the installed
    models/gpt.py, builds our MTP layer for `--spec ... dsv3_layer_spec` and `... dsv3_block_spec`
    (the callable it calls as spec(config, vp_stage=...)); the installed (unpatched) builder builds
    Megatron's own MTP, and `check_mtp_layers` refuses that by name."""
    run_ranks(1, [str(Path(__file__).parent / "megatron_lm_ranks.py"), "builder",
                  str(PATCHES / "megatron-lm-0.19-models_gpt-spec-mtp.patch"), str(tmp_path)], timeout=240)
    result = torch.load(tmp_path / "builder.pt")
    assert result["patched"] == {"dsv3_layer_spec": "MegatronMLA + MegatronDeepSeekMoE",
                                 "dsv3_block_spec": "MegatronMLA + MegatronDeepSeekMoE"}
    assert "MTP layer 0 was built from Megatron's own specs" in result["unpatched"]
    assert "self_attention=megatron.core.transformer.multi_latent_attention.MLASelfAttention" in result["unpatched"]
