"""DualPipe and DualPipeV (report section 3.2.1): stage cutting, refusals, and one training step on
gloo ranks equal to the single-process step (fp32, MoE and MTP on), compared as tests/test_parallel.py
compares its layouts: losses, every gradient, every updated parameter (AdamW's first step from the
rank's own moments) and the moments within its tolerances, routing biases bitwise."""
from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from test_parallel import WORKER, assert_step_matches

from megatron_dsv3 import registry
from megatron_dsv3.pipeline import get_schedule, simulate
from megatron_dsv3.pipeline.dualpipe import messages, owners
from megatron_dsv3.plan import PlanError, check_schedule

LAYERS = 8  # enough for DualPipeV's 8 stages on PP4


def test_stage_cut_and_rank_stages():
    one_f, dual, v = (get_schedule(name) for name in ("1f1b", "dualpipe", "dualpipev"))
    assert [list(r) for r in one_f.stage_cut(8, 2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [len(r) for r in v.stage_cut(8, 2)] == [2, 2, 2, 2]
    assert v.num_stages(4) == 8 and dual.num_stages(4) == 4
    assert dual.rank_stages(4, 1) == (1, 2) and dual.rank_stages(4, 3) == (3, 0)
    assert v.rank_stages(4, 0) == (0, 7) and v.rank_stages(4, 3) == (3, 4)


@pytest.mark.parametrize("name", registry.names("schedule"))
def test_every_descriptor_agrees_with_its_operation_lists(name):
    """Each stage is held `model_copies` times, `stages_per_rank` on every rank, and the operation
    lists put each stage on the ranks that hold it; the memory estimate's micro-batches held are
    the lists' peak (1F1B: PP, DualPipe: PP + 1, DualPipeV: 2 PP + 1 chunks)."""
    schedule, pp, micro_batches = get_schedule(name), 4, 16
    held = [s for r in range(pp) for s in schedule.rank_stages(pp, r)]
    assert sorted(held) == sorted(list(range(schedule.num_stages(pp))) * schedule.model_copies)
    assert all(len(schedule.rank_stages(pp, r)) == schedule.stages_per_rank for r in range(pp))
    op_lists = schedule.op_lists(pp, micro_batches)
    assert (op_lists.stages, len(op_lists.ranks)) == (schedule.num_stages(pp), pp)
    for rank, ops in enumerate(op_lists.ranks):
        assert {stage for op in ops for _, stage in op.micro_stages} == set(schedule.rank_stages(pp, rank))
    expected = {"1f1b": pp, "zb1p": pp, "dualpipe": pp + 1, "dualpipev": 2 * pp + 1}[name]
    assert schedule.micro_batches_held(pp, micro_batches) == expected


def test_runtime_walks_the_simulators_ops_and_messages_match():
    """Every message a rank expects is one its peer sends, and the stages' owners are the layout's."""
    for name, pp in (("dualpipe", 4), ("dualpipev", 4)):
        descriptor = get_schedule(name)
        schedule = descriptor.op_lists(pp, 8)
        owner = owners(schedule)
        for (mb, stage), rank in owner.items():
            assert stage in descriptor.rank_stages(pp, rank)
        for src in range(pp):
            for dst in range(pp):
                if src != dst:
                    for kind, (mb, stage) in messages(schedule, src, dst):
                        assert owner[mb, stage + (1 if kind == "F" else -1)] == dst


@pytest.mark.parametrize("schedule,pp,micro,layers,error", [
    ("dualpipe", 3, 12, 8, "parallel.pipeline=3"), ("dualpipe", 2, 6, 8, None), ("dualpipe", 2, 3, 8, "micro-batches"),
    ("dualpipev", 2, 3, 8, "2 x PP = 4"), ("dualpipe", 1, 4, 8, "at least 2 pipeline ranks"),
    ("dualpipev", 2, 4, 3, "model.num_layers=3 does not split into the 4 stages of dualpipev"),
    ("dualpipev", 2, 4, 4, None)])
def test_refusals_name_the_field(schedule, pp, micro, layers, error):
    if error is None:
        check_schedule(get_schedule(schedule), pp, micro, layers)
        return
    with pytest.raises(PlanError, match=error):
        check_schedule(get_schedule(schedule), pp, micro, layers)


def test_dsv3_train_refuses_a_v_with_more_stages_than_layers():
    """Through the plan dsv3-train and dsv3-launch's preflight make: refused before any compute."""
    from megatron_dsv3.plan import make_plan
    from megatron_dsv3.run_config import load_run_config

    run = load_run_config(None, ("parallel.pipeline=2", "parallel.schedule=dualpipev", "train.global_batch_size=32"))
    with pytest.raises(PlanError, match="model.num_layers=3 does not split into the 4 stages of dualpipev"):
        make_plan(run, world=2, ranks_per_node=2, cuda=False)
    plan = make_plan(load_run_config(None, ("parallel.pipeline=2", "parallel.schedule=dualpipev",
                                            "train.global_batch_size=32", "model.overrides.num_layers=4")),
                     world=2, ranks_per_node=2, cuda=False)
    assert plan.stage_layers == get_schedule("dualpipev").stage_cut(4, 2) and len(plan.stage_layers) == 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("dualpipe_ref")
    run_ranks(1, [WORKER, "step", str(out), "--write-state", "--layers", str(LAYERS)])
    return out, torch.load(out / "rank0.pt"), torch.load(out / "state.pt")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule,pipeline,expert,world,micro,optimizer,hook", [
    ("dualpipe", 2, 1, 2, 2, "local", False), ("dualpipe", 4, 1, 4, 1, "local", False),
    ("dualpipev", 2, 1, 2, 2, "local", False), ("dualpipev", 4, 1, 4, 1, "local", True),
    ("dualpipe", 2, 2, 4, 1, "distributed", False)],
    ids=["DualPipe-PP2", "DualPipe-PP4", "DualPipeV-PP2", "DualPipeV-PP4-via-Megatron-hook",
         "DualPipe-PP2xEP2xDP2-ZeRO1"])
def test_one_step_matches_single_process(reference, tmp_path, schedule, pipeline, expert, world, micro, optimizer,
                                         hook):
    """DualPipeV-PP4 takes its schedule from Megatron-Core's get_forward_backward_func() after
    `megatron_dsv3.pipeline.install("dualpipev")`, as Megatron-LM's training loop would."""
    ref_dir, ref, initial = reference
    shutil.copy(ref_dir / "state.pt", tmp_path / "state.pt")
    run_ranks(world, [WORKER, "step", str(tmp_path), "--pipeline", str(pipeline), "--expert", str(expert),
                      "--schedule", schedule, "--micro", str(micro), "--layers", str(LAYERS),
                      "--optimizer", optimizer, *(["--via-megatron-hook"] if hook else [])], timeout=280)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert_step_matches(ref, ranks, initial, optimizer)
    if expert > 1:
        assert all(r["sent_away"] > 0 for r in ranks)
    if schedule == "dualpipev":  # the V: no rank holds the whole model
        assert all(len(r["params"]) < len(ref["params"]) for r in ranks)


@pytest.fixture(scope="module")
def reference_evaluation(reference, tmp_path_factory):
    """The single-process forward-only passes (Megatron-Core's own schedule) from the reference's
    initial weights."""
    out = tmp_path_factory.mktemp("dualpipe_eval_ref")
    shutil.copy(reference[0] / "state.pt", out / "state.pt")
    run_ranks(1, [WORKER, "evaluate", str(out), "--layers", str(LAYERS)])
    return torch.load(out / "eval0.pt"), out / "state.pt"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule,optimizer", [("dualpipe", "local"), ("dualpipev", "distributed")],
                         ids=["DualPipe-PP2", "DualPipeV-PP2-ZeRO1"])
def test_forward_only_pass_equals_the_single_process_forward_and_changes_nothing(reference_evaluation, tmp_path,
                                                                                 schedule, optimizer):
    """Validation under DualPipe and DualPipeV (`forward_only=True`, what Megatron-LM's evaluate()
    and dsv3-train's validation call): LM and MTP losses equal the single process's (1e-5), before
    and after a training step; the pass after the step leaves every parameter, gradient (ZeRO-1:
    Megatron's main_grad too), buffer and optimizer state bitwise as the step left them."""
    ref, state = reference_evaluation
    shutil.copy(state, tmp_path / "state.pt")
    run_ranks(2, [WORKER, "evaluate", str(tmp_path), "--pipeline", "2", "--schedule", schedule,
                  "--layers", str(LAYERS), "--optimizer", optimizer], timeout=280)
    ranks = [torch.load(tmp_path / f"eval{r}.pt") for r in range(2)]
    assert ref["changed"] == [] and ref["before_step"] != ref["after_step"]  # the step moved the model
    for got in ranks:
        assert got["changed"] == [] and got["state"] > 50
        for when in ("before_step", "after_step"):
            lm, mtp, balance = got[when]
            assert lm == pytest.approx(ref[when][0], rel=1e-5) and mtp == pytest.approx(ref[when][1], rel=1e-5)
            assert lm > 1 and mtp > 1 and balance == 0  # eval mode: no balance loss


def test_forward_only_lists_are_each_ranks_forwards_and_never_deadlock():
    """`simulate.forwards` keeps every forward, on its rank, in its order, and no backward; timed by
    the simulator (which raises on a deadlock) at every size the rules allow up to PP 8."""
    for name in ("dualpipe", "dualpipev"):
        descriptor = get_schedule(name)
        for pp in (2, 4, 6, 8):
            for micro in range(2 * pp, 4 * pp + 1, 2):
                full = descriptor.op_lists(pp, micro)
                forwards = simulate.forwards(full)
                for ops, only in zip(full.ranks, forwards.ranks):
                    assert [op.micro_stages for op in only] == [(op.forward,) for op in ops if op.forward]
                    assert all(op.kind == "F" for op in only)
                slots = simulate.simulate(forwards, simulate.Costs())
                assert len(slots) == micro * full.stages


def test_split_backward_defers_the_weight_gradient_and_adds_up_to_the_full_one():
    """ModelChunk's B gives the input gradient with no parameter gradient yet; its W then gives the
    parameters the full backward's gradients."""
    from megatron_dsv3.pipeline.dualpipe import ModelChunk

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    x, g = torch.randn(3, 8), torch.randn(3, 8)

    class Stage:  # Megatron's model-chunk contract: set_input_tensor, then forward_step_func(data, chunk)
        def set_input_tensor(self, tensors):
            self.input = tensors[0]

        def parameters(self):
            return layer.parameters()

    def forward_step(data, chunk):
        return layer(chunk.input), None

    results = {}
    for split in (False, True):
        layer.zero_grad(set_to_none=True)
        chunk = ModelChunk(Stage(), stage=1, stages=3, forward_step_func=forward_step, data=iter([]),
                           num_microbatches=1)
        chunk.forward(0, x)
        dx = chunk.backward(0, g, split=split)
        if split:
            assert all(p.grad is None for p in layer.parameters())
            chunk.weight_grad(0)
        results[split] = (dx, [p.grad.clone() for p in layer.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_megatron_keywords_are_accepted_and_others_refused_by_name():
    """The executor names the keywords Megatron-Core's schedules take (0.16-0.19 pass the same set
    to all three of its schedules), accepts them all and refuses any other by name."""
    from megatron.core.pipeline_parallel import schedules

    forward_backward = get_schedule("dualpipev").forward_backward_func()
    ours = set(inspect.signature(forward_backward).parameters)
    for megatron_schedule in (schedules.forward_backward_no_pipelining,
                              schedules.forward_backward_pipelining_without_interleaving,
                              schedules.forward_backward_pipelining_with_interleaving):
        assert set(inspect.signature(megatron_schedule).parameters) == ours, megatron_schedule.__name__
    keywords = dict(forward_step_func=None, data_iterator=None, model=[], num_microbatches=4, seq_length=8,
                    micro_batch_size=1, decoder_seq_length=8, forward_only=False, collect_non_loss_data=True,
                    first_val_step=None, adjust_tensor_shapes_fn=None, p2p_communicator=None, pg_collection=None,
                    force_all_reduce=False)
    assert set(keywords) == ours
    with pytest.raises(ValueError, match=r"dualpipev: collect_non_loss_data=True needs forward_only=True"):
        forward_backward(**keywords)  # every keyword accepted: the refusal is about their values
    with pytest.raises(TypeError, match="unexpected keyword argument 'microbatch_group_size'"):
        forward_backward(**keywords, microbatch_group_size=2)
    assert all(get_schedule(name).forward_only for name in ("1f1b", "dualpipe", "dualpipev"))


# ----------------------------------------------------------------------------- dsv3-train
@pytest.fixture(scope="module")
def train_ranks(tmp_path_factory):
    from test_train import RankServer

    server = RankServer(tmp_path_factory.mktemp("dualpipe_rank_server"))
    yield server
    server.close()


TRAIN = ["train.seq_length=32", "train.micro_batch_size=1", "train.global_batch_size=4", "logging.interval=1",
         "train.warmup_steps=10", "logging.jsonl=true", "logging.console=true", "logging.wandb=false",
         "parallel.timeout_s=60", "checkpoint.save_timeout_s=120", "model.overrides.num_layers=4"]


@pytest.mark.timeout(300)
def test_a_1f1b_checkpoint_resumes_under_dualpipe_and_dualpipev(tmp_path, train_ranks):
    """Saved at step 2 by 1F1B on two pipeline ranks; steps 3 and 4 resumed under DualPipe (PP2, two
    copies of the model) and DualPipeV (PP2, four stages) give 1F1B's losses (1e-5 relative) and grad
    norms (1e-4), and their step-4 checkpoints (DualPipe's mirrored copy saved once) hold its weights."""
    from test_train import _load_checkpoint, _records

    def run(name: str, *extra: str) -> Path:
        run_dir = tmp_path / name
        argv = [*TRAIN, f"checkpoint.dir={run_dir / 'ckpt'}", "parallel.pipeline=2", "train.steps=4",
                "checkpoint.save_interval=2", *extra]
        codes, logs = train_ranks.run(2, argv, run_dir / "logs", timeout=200)
        assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
        return run_dir

    source = run("1f1b", "parallel.schedule=1f1b")
    reference = {r["step"]: r for r in _records(source)}
    ref_tensors, _, _ = _load_checkpoint(source / "ckpt" / "iter_0000004")
    for schedule in ("dualpipe", "dualpipev"):
        target = tmp_path / schedule / "ckpt"
        target.mkdir(parents=True)
        shutil.copytree(source / "ckpt" / "iter_0000002", target / "iter_0000002")
        (target / "latest").write_text("2\n")
        resumed = run(schedule, f"parallel.schedule={schedule}")
        log = (resumed / "logs" / "rank0.log").read_text()
        assert "resumed from step 2" in log and f"{schedule} over 4 micro-batches" in log
        got = {r["step"]: r for r in _records(resumed)}
        assert sorted(got) == [3, 4]
        for step in (3, 4):
            assert got[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), (schedule, step)
            assert got[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-4)
        tensors, _, common = _load_checkpoint(resumed / "ckpt" / "iter_0000004")
        assert common["optimizer_steps"] == 4 and tensors.keys() == ref_tensors.keys()
        for name, value in ref_tensors.items():
            torch.testing.assert_close(tensors[name], value, rtol=0, atol=1e-5, msg=f"{schedule}: {name}")


@pytest.mark.timeout(300)
def test_the_671b_example_recipe_trains_a_few_steps(tmp_path, train_ranks):
    """examples/671b-2048xh800.yaml as written, shrunk only where a CPU cannot hold it: the tiny shape
    with 4 layers, 2 gloo ranks (pipeline 2, expert 1), 4 micro-batches of 1 x 32 tokens, 2 steps, the
    embedded corpus, BF16 off. DualPipe, ZeRO-1, FP8 tiles, selective recompute and BF16 moments stay."""
    from test_train import _records

    run_dir = tmp_path / "671b"
    argv = ["--config", "examples/671b-2048xh800.yaml", "model.preset=tiny", "model.overrides.num_layers=4",
            "parallel.pipeline=2", "parallel.expert=1", "train.micro_batch_size=1", "train.global_batch_size=4",
            "train.seq_length=32", "train.steps=2", "train.warmup_steps=1", "train.bf16=false",
            "train.param_dtype=float32", "train.device=cpu", "data.paths=[]", f"checkpoint.dir={run_dir / 'ckpt'}",
            "logging.wandb=false", "parallel.timeout_s=60"]
    codes, logs = train_ranks.run(2, argv, run_dir / "logs", timeout=240)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "dualpipe over 4 micro-batches" in logs[0] and "Megatron DistributedOptimizer (ZeRO-1" in logs[0]
    assert "fp8: " in logs[0]
    losses = [r["loss"] for r in _records(run_dir)]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses) and losses[1] < losses[0]


def test_without_overlap_runs_each_f_and_b_pair_as_forward_then_backward():
    """The CPU runtime's order (the benchmark's prediction): every F&B op becomes F then BW, the same
    chunks are computed, and starting each half on its own input never makes the step longer."""
    for schedule in (simulate.dualpipe(4, 8), simulate.dualpipev(8, 8)):
        split = simulate.without_overlap(schedule)
        simulate.validate(split)
        assert not any(op.kind == "F&B" for ops in split.ranks for op in ops)
        pairs = sum(op.kind == "F&B" for ops in schedule.ranks for op in ops)
        assert sum(map(len, split.ranks)) == sum(map(len, schedule.ranks)) + pairs > sum(map(len, schedule.ranks))
        costs = simulate.Costs(f=1, b=2, w=1, fb=3)
        assert simulate.summarize(split, costs)["step_time"] <= simulate.summarize(schedule, costs)["step_time"]
