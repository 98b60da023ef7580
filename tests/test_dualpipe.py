"""DualPipe and DualPipeV (report section 3.2.1): stage cutting, refusals, and one training step on
gloo ranks equal to the single-process step (fp32, MoE and MTP on), compared as tests/test_parallel.py
compares its layouts: losses, every gradient, every updated parameter (AdamW's first step from the
rank's own moments) and the moments within its tolerances, routing biases bitwise."""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import shutil
from pathlib import Path

import pytest
import torch

from helpers.distributed import run_ranks
from helpers.rank_server import RankServer
from helpers.run_dirs import load_checkpoint, metric_records
from helpers.step_check import WORKER, assert_step_matches

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
@pytest.mark.slow
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
@pytest.mark.slow
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
    # Megatron's return value: every micro-batch's report, in order, on the last pipeline rank only
    assert ranks[0]["reports"] == [] and len(ranks[1]["reports"]) == len(ref["reports"]) == 4
    for got, expected in zip(ranks[1]["reports"], ref["reports"]):
        assert torch.equal(got["tokens"], expected["tokens"])
        torch.testing.assert_close(got["lm loss"], expected["lm loss"], rtol=1e-5, atol=0)
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
    server = RankServer(tmp_path_factory.mktemp("dualpipe_rank_server"))
    yield server
    server.close()


TRAIN = ["train.seq_length=32", "train.micro_batch_size=1", "train.global_batch_size=4", "logging.interval=1",
         "train.warmup_steps=10", "logging.jsonl=true", "logging.console=true", "logging.wandb=false",
         "parallel.timeout_s=60", "checkpoint.save_timeout_s=120", "model.overrides.num_layers=4"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_1f1b_checkpoint_resumes_under_dualpipe_and_dualpipev(tmp_path, train_ranks):
    """Saved at step 2 by 1F1B on two pipeline ranks; steps 3 and 4 resumed under DualPipe (PP2, two
    copies of the model) and DualPipeV (PP2, four stages) give 1F1B's losses (1e-5 relative) and grad
    norms (1e-4), and their step-4 checkpoints (DualPipe's mirrored copy saved once) hold its weights."""
    def run(name: str, *extra: str) -> Path:
        run_dir = tmp_path / name
        argv = [*TRAIN, f"checkpoint.dir={run_dir / 'ckpt'}", "parallel.pipeline=2", "train.steps=4",
                "checkpoint.save_interval=2", *extra]
        codes, logs = train_ranks.run(2, argv, run_dir / "logs", timeout=200)
        assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
        return run_dir

    source = run("1f1b", "parallel.schedule=1f1b")
    reference = {r["step"]: r for r in metric_records(source)}
    ref_tensors, _, _ = load_checkpoint(source / "ckpt" / "iter_0000004")
    for schedule in ("dualpipe", "dualpipev"):
        target = tmp_path / schedule / "ckpt"
        target.mkdir(parents=True)
        shutil.copytree(source / "ckpt" / "iter_0000002", target / "iter_0000002")
        (target / "latest").write_text("2\n")
        resumed = run(schedule, f"parallel.schedule={schedule}")
        log = (resumed / "logs" / "rank0.log").read_text()
        assert "resumed from step 2" in log and f"{schedule} over 4 micro-batches" in log
        got = {r["step"]: r for r in metric_records(resumed)}
        assert sorted(got) == [3, 4]
        for step in (3, 4):
            assert got[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), (schedule, step)
            assert got[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-4)
        tensors, _, common = load_checkpoint(resumed / "ckpt" / "iter_0000004")
        assert common["optimizer_steps"] == 4 and tensors.keys() == ref_tensors.keys()
        for name, value in ref_tensors.items():
            torch.testing.assert_close(tensors[name], value, rtol=0, atol=1e-5, msg=f"{schedule}: {name}")


@pytest.mark.timeout(300)
def test_the_671b_example_recipe_trains_a_few_steps(tmp_path, train_ranks):
    """examples/671b-2048xh800.yaml as written, shrunk only where a CPU cannot hold it: the tiny shape
    with 4 layers, 2 gloo ranks (pipeline 2, expert 1), 4 micro-batches of 1 x 32 tokens, 2 steps, the
    embedded corpus, BF16 off. DualPipe, ZeRO-1, FP8 tiles, full recomputation and BF16 moments stay."""
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
    losses = [r["loss"] for r in metric_records(run_dir)]
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


# ----------------------------------------------------------------------------- memory (issue 24)
def _tiny_runner(stage: int, stages: int, segmented: bool, recompute: str = "none"):
    """A ModelChunk over the tiny model's `stage` of `stages` (MoE and MTP on, `recompute`), driven
    as stages.forward_backward drives it, with one micro-batch."""
    from megatron_dsv3 import DSV3Config, build_model
    from megatron_dsv3.pipeline.dualpipe import ModelChunk
    from megatron_dsv3.pipeline.pieces import stage_pieces
    from megatron_dsv3.pipeline.stages import ScheduledModel

    config = DSV3Config.preset("tiny", mtp_num_modules=1, mtp_loss_weight=0.3, seq_aux_loss_coeff=0.01)
    model = build_model(config, seed=1, stages=(stage,), num_stages=stages)
    model.recompute = recompute
    data = torch.randint(0, config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
    tokens, labels = data[:, :-1], data[:, 1:]

    def output_of(out):
        return out if stage == stages - 1 else out.transpose(0, 1).contiguous()

    def plain_step(data_iterator, chunk):
        next(data_iterator)
        return output_of(model(tokens, labels=labels, stage=stage)), lambda out: (out.loss, {})

    def cut_step(data_iterator, chunk, return_schedule_plan=False):
        next(data_iterator)
        cut = stage_pieces(model, tokens, labels, stage=stage)
        return dataclasses.replace(cut, output=lambda state, inner=cut.output: output_of(inner(state))), \
            lambda out: (out.loss, {})

    chunk = ScheduledModel(model, 1, stages, stage=stage)
    runner = ModelChunk(chunk, stage, stages, cut_step if segmented else plain_step, itertools.repeat(None), 1)
    assert runner.segmented == segmented and runner.defers
    return model, runner, config


@pytest.mark.parametrize("recompute", ["none", "selective"])
@pytest.mark.parametrize("segmented", [False, True], ids=["whole", "pieces"])
def test_a_split_backward_frees_the_graph_and_keeps_only_what_w_needs(segmented, recompute):
    """B of a micro-batch on the last stage: its input gradient now, no GEMM weight gradient; the bytes
    it still holds afterwards are its W store's alone (each GEMM's input and output gradient), without
    recomputation well under what the forward saved; W then frees them and gives the unsplit
    backward's gradients. Under selective recomputation B replays once and W replays nothing."""
    from helpers.activation_memory import ActivationBytes, tensors_in

    gradients = {}
    for split in (False, True):
        model, runner, config = _tiny_runner(1, 2, segmented, recompute)
        tracker = ActivationBytes(model.parameters(), lambda: tensors_in([runner.saved, runner.deferred]))
        x = torch.randn(16, 1, config.hidden_size, generator=torch.Generator().manual_seed(2))
        with tracker:
            runner.forward(0, x)
            forward = tracker.now()
            dx = runner.backward(0, None, split=split)
            after_b = tracker.now()
            if split:
                stored = runner.deferred[0].__self__
                store = getattr(stored, "store", stored)
                assert len(store) > 10 and after_b == sum(
                    {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in store.tensors()}.values())
                assert 0 < after_b < (0.8 if recompute == "none" else 1.1) * forward
                deferred = {n for n, p in model.named_parameters() if p.grad is None}
                assert any(".experts." in n for n in deferred) and "lm_head.weight" in deferred
                replays = []
                hooks = [layer.register_forward_hook(lambda *_: replays.append(1)) for layer in model.layers.values()]
                runner.weight_grad(0)
                assert not replays
                for hook in hooks:
                    hook.remove()
            assert tracker.now() == 0 and not runner.saved and not runner.deferred
        gradients[split] = (dx, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(gradients[True][0], gradients[False][0], rtol=0, atol=0)
    assert gradients[True][1].keys() == gradients[False][1].keys()
    for name, grad in gradients[False][1].items():
        torch.testing.assert_close(gradients[True][1][name], grad, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("segmented", [False, True], ids=["whole", "pieces"])
def test_under_full_recomputation_b_takes_the_weight_gradients_and_keeps_nothing(segmented):
    """A chunk that recomputes fully does not split: B of a micro-batch gives every weight gradient
    the whole backward gives, bitwise, and holds nothing afterwards (a W store would hold each GEMM's
    input and output gradient, more than the layer input the recomputation keeps); W does nothing."""
    from helpers.activation_memory import ActivationBytes, tensors_in

    gradients = {}
    for split in (False, True):
        model, runner, config = _tiny_runner(1, 2, segmented, "full")
        assert not runner.splits
        tracker = ActivationBytes(model.parameters(), lambda: tensors_in([runner.saved, runner.deferred]))
        x = torch.randn(16, 1, config.hidden_size, generator=torch.Generator().manual_seed(2))
        with tracker:
            runner.forward(0, x)
            dx = runner.backward(0, None, split=split)
            assert tracker.now() == 0 and not runner.saved and not runner.deferred
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            runner.weight_grad(0)
        assert {n: p.grad for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
        gradients[split] = (dx, grads)
    assert any(".experts." in n for n in gradients[True][1]) and "lm_head.weight" in gradients[True][1]
    torch.testing.assert_close(gradients[True][0], gradients[False][0], rtol=0, atol=0)
    assert gradients[True][1].keys() == gradients[False][1].keys()
    for name, grad in gradients[False][1].items():
        torch.testing.assert_close(gradients[True][1][name], grad, rtol=0, atol=0, msg=name)


def test_a_sent_stage_output_keeps_only_its_graph_edge():
    """After a forward, the runner keeps the output's autograd edge, not the output: once the caller
    (the transport, until its send completes) lets the sent copy go, its storage is free; backward
    from the edge gives the input gradient of a runner that kept nothing freed."""
    import weakref

    model, runner, config = _tiny_runner(0, 2, segmented=False)
    outputs = []
    step = runner.forward_step_func

    def recording_step(data_iterator, chunk):
        output, loss_func = step(data_iterator, chunk)
        outputs.append(weakref.ref(output))
        return output, loss_func

    runner.forward_step_func = recording_step
    sent = runner.forward(0, None)
    _, root, _ = runner.saved[0]
    assert isinstance(root[0], torch.autograd.graph.GradientEdge) and outputs[0]() is None
    del sent
    runner.backward(0, torch.ones(16, 1, config.hidden_size), split=False)
    assert all(p.grad is not None for n, p in model.named_parameters() if "layers.0." in n)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("schedule,pipeline", [("dualpipe", 2), ("dualpipev", 2), ("dualpipe", 4), ("dualpipev", 4)],
                         ids=["DualPipe-PP2", "DualPipeV-PP2", "DualPipe-PP4", "DualPipeV-PP4"])
def test_activation_bytes_stay_within_the_micro_batches_the_simulator_holds(reference, tmp_path, schedule, pipeline):
    """On gloo, one step of 8 micro-batches: each rank's peak of saved activations plus held outputs
    and W stores is at most the simulator's micro-batches in flight (`simulate.peak_activations`)
    times one micro-batch's forward on the rank's larger stage (what autograd saves, and the output
    until sent); nothing is left once the step ends; and every deferred W finds less held than that
    peak (its micro-batch's graph is gone). BENCHMARKS.md has the numbers before and after."""
    shutil.copy(reference[0] / "state.pt", tmp_path / "state.pt")
    run_ranks(pipeline, [WORKER, "activations", str(tmp_path), "--pipeline", str(pipeline), "--schedule", schedule,
                         "--layers", str(LAYERS), "--micro", "1"], timeout=380)
    for rank in range(pipeline):
        got = torch.load(tmp_path / f"activations{rank}.pt")
        one = max(got["per_stage"].values())
        assert got["in_flight"] == get_schedule(schedule).micro_batches_held(pipeline, 8) or rank not in (0,)
        assert 0 < got["peak"] <= got["in_flight"] * one, (rank, got)
        assert got["after"] == 0 and got["at_w"] and max(got["at_w"]) < got["peak"]


# ----------------------------------------------------------------------------- Megatron's wrappers (issue 23)
class _Wrapper(torch.nn.Module):
    """Megatron's DDP / Float16Module as the schedules see them: the model under `.module`, without
    `set_input_tensor` or the pre/post-process flags of its own."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class _MegatronChunk(torch.nn.Module):
    """What a Megatron GPTModel chunk tells of its stage: `pre_process` (it embeds the tokens) and
    `post_process` (it computes the loss)."""

    def __init__(self, pre_process: bool, post_process: bool):
        super().__init__()
        self.pre_process, self.post_process, self.inputs = pre_process, post_process, []
        self.layer = torch.nn.Linear(4, 4)

    def set_input_tensor(self, tensors):
        self.inputs.append(tensors[0])


@pytest.mark.parametrize("name,pipeline,rank,flags", [
    ("dualpipev", 2, 0, [(True, False), (False, True)]), ("dualpipev", 4, 2, [(False, False), (False, False)]),
    ("dualpipe", 4, 0, [(True, False), (False, True)]), ("dualpipe", 4, 3, [(False, True), (True, False)])])
def test_wrapped_chunks_in_the_descriptors_order_are_accepted(name, pipeline, rank, flags):
    from megatron_dsv3.pipeline.dualpipe import check_chunk_order

    check_chunk_order(get_schedule(name), pipeline, rank, [_Wrapper(_Wrapper(_MegatronChunk(*f))) for f in flags])


def test_chunks_out_of_order_are_refused_by_name_before_any_operation():
    """DualPipeV's V reversed on rank 0 (Megatron's flags tell), a DualPipe mirror copy swapped
    (dsv3-train's chunks carry their stage), a chunk missing: each refused naming the rank, the
    chunk, what it should be and what it is."""
    from megatron_dsv3.pipeline.dualpipe import check_chunk_order

    reversed_v = [_Wrapper(_MegatronChunk(False, True)), _Wrapper(_MegatronChunk(True, False))]
    with pytest.raises(ValueError, match=r"dualpipev: pipeline rank 0 runs stages \(0, 3\) of 0\.\.3, so its chunk 0 "
                                         r"must run stage 0 \(pre_process=True, post_process=False\), but it has "
                                         r"pre_process=False, post_process=True: pass the rank's chunks in the order "
                                         r"\(0, 3\)"):
        check_chunk_order(get_schedule("dualpipev"), 2, 0, reversed_v)

    class Staged:  # dsv3-train's ScheduledModel: the stage it runs
        def __init__(self, stage):
            self.stage = stage

    with pytest.raises(ValueError, match=r"dualpipe: pipeline rank 1 runs stages \(1, 2\) of 0\.\.3, so its chunk 0 "
                                         r"must run stage 1 \(stage=1\), but it has stage=2"):
        check_chunk_order(get_schedule("dualpipe"), 4, 1, [Staged(2), Staged(1)])
    with pytest.raises(ValueError, match=r"dualpipe: rank 1 needs its 2 model chunks \(stages \(1, 2\)\), got 1"):
        check_chunk_order(get_schedule("dualpipe"), 4, 1, [Staged(1)])


def test_the_runner_reaches_set_input_tensor_through_wrappers():
    """As Megatron's schedules do (`get_attr_wrapped_model`): the stage input reaches the wrapped
    chunk, and backward gives the input gradient of what the chunk computed from it."""
    from megatron_dsv3.pipeline.dualpipe import ModelChunk

    inner = _MegatronChunk(False, False)
    wrapped = _Wrapper(_Wrapper(inner))

    def forward_step(data, chunk):
        return inner.layer(inner.inputs[-1]), None

    runner = ModelChunk(wrapped, stage=1, stages=3, forward_step_func=forward_step, data=iter([]), num_microbatches=1)
    x = torch.randn(2, 4)
    runner.forward(0, x)
    assert torch.equal(inner.inputs[-1].detach(), x) and inner.inputs[-1].requires_grad
    dx = runner.backward(0, torch.ones(2, 4), split=False)
    torch.testing.assert_close(dx, torch.ones(2, 4) @ inner.layer.weight)
