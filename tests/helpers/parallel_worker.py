"""One rank of a parallel-correctness run (driven by tests/test_parallel.py through tests/helpers/distributed.py).

`step`: one training step of the tiny model on a fixed global batch under TP x PP x EP x DP,
through Megatron-Core's schedule and the optimizer dsv3-train uses (`--optimizer local`, or
`distributed`: Megatron's DDP + distributed optimizer), writing the losses, the grad norm, and full
(gathered over TP/EP) tensors of this rank's stage: gradients (local optimizer only; ZeRO-1 keeps
a slice of them), updated parameters and Adam moments; and the updated routing biases. With one
rank and `--write-state` it is the single-process reference and also writes the initial weights
that the parallel runs load. `--schedule dualpipe|dualpipev` builds the rank's two stages and
steps through that schedule (DualPipe: gradients summed over the mirror group); `--micro` and
`--layers` set the micro-batch size and the model's depth. `--via-megatron-hook` takes the schedule
where Megatron-LM's training loop does, from Megatron-Core's `get_forward_backward_func()`, after
`megatron_dsv3.pipeline.install(schedule)`.

`evaluate`: forward-only passes (`forward_only=True`) before and after one training step, recording
their losses and whatever the second pass changed in parameters, gradients, buffers and optimizer state.

`activations`: one training step with the activation bytes this rank holds measured (peak, and one
micro-batch's forward of each of its stages alone), beside the simulator's micro-batches in flight.

`node_limited`: expert-parallel over every rank, with emulated nodes of `--ranks-per-node`
ranks; records, for every dispatched token, how many nodes its experts live on.

`pipeline_bytes`: one step on two pipeline stages (`--bf16` under BF16 autocast, as dsv3-train's
`train.bf16`), recording the bytes and dtypes this rank sends to the other stage.
"""
from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_dsv3 import DSV3Config, build_model
from megatron_dsv3.model.moe import dispatch
from megatron_dsv3.model.moe.router import update_expert_bias
from megatron_dsv3.optim import LocalOptimizer
from megatron_dsv3.parallel import groups, initialize_parallel
from megatron_dsv3.parallel.sharding import gather_full, gather_like, load_full
from megatron_dsv3.optim.zero1 import ZeRO1Optimizer
from megatron_dsv3.pipeline import get_schedule, simulate
from megatron_dsv3.pipeline.dualpipe import mark_mirror_copies
from megatron_dsv3.pipeline.stages import ScheduledModel, forward_backward, reduce_losses
from megatron_dsv3.compat.megatron_cpu import cpu_shims

GLOBAL_BATCH, SEQ = 8, 16
MODEL = dict(seq_aux_loss_coeff=1e-3, mtp_num_modules=1, mtp_loss_weight=0.3, bias_update_rate=0.01)
LR, CLIP = 1e-3, 0.5  # the reference's gradient norm is above CLIP, so clipping is exercised


def global_batch(vocab: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:]


def record_dispatch(log: list) -> None:
    """Wrap the dispatcher and its all-to-all to log (expert ids, experts per rank) and rows sent."""
    permute, exchange = dispatch.TokenDispatcher.permute, dispatch.all_to_all

    def recording_permute(self, x, expert_ids):
        log.append(("route", expert_ids.clone(), self.experts_per_rank))
        return permute(self, x, expert_ids)

    def recording_all_to_all(x, output_splits, input_splits, group):
        log.append(("send", list(input_splits)))
        return exchange(x, output_splits, input_splits, group)

    dispatch.TokenDispatcher.permute, dispatch.all_to_all = recording_permute, recording_all_to_all


def setup(args, out: Path):
    """This rank's model (its stages of `--schedule`, the reference's initial weights), its chunks
    and optimizer, and the mirror group (DualPipe)."""
    layout = initialize_parallel(args.tensor, args.pipeline, args.expert)
    config = DSV3Config.preset("tiny", **MODEL, **({"num_layers": args.layers} if args.layers else {}))
    pp_rank = groups.rank(groups.pp_group())
    descriptor = get_schedule(args.schedule)
    stages = descriptor.rank_stages(layout.pipeline, pp_rank)
    model = build_model(config, seed=3, stages=stages, num_stages=descriptor.num_stages(layout.pipeline))
    mirror = groups.mirror_group() if descriptor.model_copies == 2 else None
    if mirror is not None:
        mark_mirror_copies(model, int(pp_rank >= layout.pipeline // 2))
    if args.write_state:
        torch.save(model.state_dict(), out / "state.pt")
    else:
        load_full(model, torch.load(out / "state.pt"))
    chunks = [ScheduledModel(model, layout.tensor, layout.pipeline, stage=s) for s in stages]
    if args.optimizer == "distributed":
        optimizer = ZeRO1Optimizer(model, chunks[0].config, lr=LR, clip_grad=CLIP, mirror=mirror)
    else:
        optimizer = LocalOptimizer(model, lr=LR, clip_grad=CLIP, mirror=mirror)
    return layout, config, model, chunks, optimizer, mirror


def micro_batches(config: DSV3Config, layout, micro: int, seed: int = 7) -> tuple[Iterator[dict], int]:
    """This data-parallel rank's share of the global batch, as micro-batches of `micro` sequences."""
    tokens, labels = global_batch(config.vocab_size, seed)
    per_rank = GLOBAL_BATCH // layout.data
    dp_rank = groups.rank(groups.dp_group())
    tokens, labels = (t[dp_rank * per_rank:(dp_rank + 1) * per_rank] for t in (tokens, labels))
    num_micro = per_rank // micro
    return iter([{"tokens": tokens[i * micro:(i + 1) * micro], "labels": labels[i * micro:(i + 1) * micro]}
                 for i in range(num_micro)]), num_micro


def step(args, out: Path) -> None:
    layout, config, model, chunks, optimizer, mirror = setup(args, out)
    descriptor = get_schedule(args.schedule)
    log: list = []
    record_dispatch(log)
    micro = args.micro  # gradient accumulation over micro-batches of 2 sequences (default)
    batches, num_micro = micro_batches(config, layout, micro)
    # The path dsv3-train takes: Megatron-Core's schedule (1F1B when pipelined), then the optimizer.
    optimizer.zero_grad()
    schedule = descriptor.forward_backward_func()
    if args.via_megatron_hook:
        import megatron.core.pipeline_parallel as megatron_pipeline

        from megatron_dsv3.pipeline import install

        install(args.schedule)
        schedule = megatron_pipeline.get_forward_backward_func()
        assert schedule.__module__ == "megatron_dsv3.pipeline.dualpipe", schedule
    stage_losses = forward_backward(schedule, chunks, batches, num_micro, micro, SEQ, bf16=False)
    lm, mtp, balance = reduce_losses(stage_losses)
    grad_norm = optimizer.step(LR)
    # The averaged, clipped gradients the update used (ZeRO-1 holds only its slice of them).
    grads = gather_full(model, use_grad=True) if args.optimizer == "local" else {}
    params = gather_full(model)
    states = optimizer.param_states()
    params_by_name = dict(model.named_parameters())
    moments = {m: gather_like(params_by_name, {n: s[m] for n, s in states.items()}) for m in ("exp_avg", "exp_avg_sq")}
    update_expert_bias(model.routers(), config.bias_update_rate,
                       groups.dp_mirror_group() if mirror is not None else groups.dp_group())
    bias = {m.layer_number: m.router.expert_bias.clone() for m in model.moe_layers()}
    rank = dist.get_rank()
    sent_away = sum(n for kind, *rest in log if kind == "send"
                    for r, n in enumerate(rest[0]) if r != groups.rank(groups.ep_group()))
    torch.save({"loss": lm, "mtp_loss": mtp, "balance_loss": balance, "grad_norm": grad_norm, "bias": bias,
                "sent_away": sent_away, "grads": grads, "params": params, "moments": moments},
               out / f"rank{rank}.pt")


def state_of(model: torch.nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """Every parameter, gradient (`.grad`, and Megatron DDP's `main_grad`), buffer and optimizer
    state tensor of this rank, copied."""
    state = {f"param {n}": p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for kind in ("grad", "main_grad"):
            if getattr(p, kind, None) is not None:
                state[f"{kind} {n}"] = getattr(p, kind).detach().clone()
    state.update({f"buffer {n}": b.clone() for n, b in model.named_buffers()})
    for n, moments in optimizer.param_states().items():
        state.update({f"{m} {n}": t.clone() for m, t in moments.items() if isinstance(t, torch.Tensor)})
    return state


def evaluate(args, out: Path) -> None:
    """A forward-only pass on held-out micro-batches (the model in eval mode, as an evaluation runs
    it), then one training step, then the same forward-only pass again; records both passes'
    losses and what the second pass changed in the rank's training state."""
    layout, config, model, chunks, optimizer, _ = setup(args, out)
    schedule = get_schedule(args.schedule).forward_backward_func()

    def validation_losses() -> list[float]:
        batches, num_micro = micro_batches(config, layout, args.micro, seed=11)
        model.eval()
        losses = forward_backward(schedule, chunks, batches, num_micro, args.micro, SEQ, bf16=False,
                                  forward_only=True)
        model.train()
        return reduce_losses(losses)

    before_step = validation_losses()
    reports = loss_reports(schedule, chunks, config, layout, args.micro)
    optimizer.zero_grad()
    batches, num_micro = micro_batches(config, layout, args.micro)
    forward_backward(schedule, chunks, batches, num_micro, args.micro, SEQ, bf16=False)
    optimizer.step(LR)
    state = state_of(model, optimizer)
    after_step = validation_losses()
    changed = [name for name, value in state_of(model, optimizer).items()
               if name not in state or not torch.equal(value, state[name])]
    changed += [name for name in state if name not in state_of(model, optimizer)]
    torch.save({"before_step": before_step, "after_step": after_step, "changed": changed, "state": len(state),
                "reports": reports}, out / f"eval{dist.get_rank()}.pt")


def loss_reports(schedule, chunks, config: DSV3Config, layout, micro: int) -> list:
    """What the schedule itself returns for a forward-only pass, as Megatron-LM's evaluate() reads
    it: here each micro-batch's loss_func reports its LM loss and its first tokens."""
    batches, num_micro = micro_batches(config, layout, micro, seed=11)

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        out = chunk.module(batch["tokens"], labels=batch["labels"], stage=chunk.stage)
        report = {"lm loss": out.lm_loss, "tokens": batch["tokens"][0, :4]} if chunk.last_stage else None
        return (out if chunk.last_stage else out.transpose(0, 1).contiguous()), lambda output: (output.loss, report)

    chunks[0].module.eval()
    with torch.no_grad():
        reports = schedule(forward_step_func=forward_step, data_iterator=batches, model=list(chunks),
                           num_microbatches=num_micro, seq_length=SEQ, micro_batch_size=micro, forward_only=True)
    chunks[0].module.train()
    return reports


def activations(args, out: Path) -> None:
    """One training step under `--schedule` with the activation bytes this rank holds measured
    (tests/helpers/activation_memory.py): the peak, the bytes held as each deferred W starts, and what
    one micro-batch's forward of each of its stages holds (what autograd saves, and the output until
    it is sent). The executor's records (stage runners, transport) are found by recording the
    instances it makes."""
    from megatron_dsv3.pipeline import dualpipe

    from activation_memory import ActivationBytes, tensors_in

    layout, config, model, chunks, optimizer, _ = setup(args, out)
    made: dict[str, list] = {"runners": [], "transports": [], "at_w": []}
    for cls, kind in ((dualpipe.ModelChunk, "runners"), (dualpipe.Transport, "transports")):
        def recording_init(self, *a, init=cls.__init__, kind=kind, **k):
            init(self, *a, **k)
            made[kind].append(self)
        cls.__init__ = recording_init

    def weight_grad(self, mb, run=dualpipe.ModelChunk.weight_grad):  # what a deferred W finds held
        made["at_w"].append(tracker.sample())
        run(self, mb)
    dualpipe.ModelChunk.weight_grad = weight_grad

    def held() -> list[torch.Tensor]:
        records = [[r.saved, r.deferred] for r in made["runners"]]
        records += [[t.pending_sends, t.local] for t in made["transports"]]
        return list(tensors_in(records))

    micro, params = args.micro, list(model.parameters())
    per_stage = {}
    for chunk in chunks:  # one micro-batch's forward of each stage, alone
        batches, _ = micro_batches(config, layout, micro)
        batch = next(batches)
        model.input_hidden = None if chunk.stage == 0 else torch.randn(micro, SEQ, config.hidden_size,
                                                                       requires_grad=True)
        with ActivationBytes(params) as one:
            output = model(batch["tokens"], labels=batch["labels"], stage=chunk.stage)
        sent = output.untyped_storage().nbytes() if isinstance(output, torch.Tensor) else 0  # held until sent
        per_stage[chunk.stage] = one.now() + sent
        del output
        model.input_hidden = None
    batches, num_micro = micro_batches(config, layout, micro)
    schedule = get_schedule(args.schedule)
    optimizer.zero_grad()
    with ActivationBytes(params, held) as tracker:
        forward_backward(schedule.forward_backward_func(), chunks, batches, num_micro, micro, SEQ, bf16=False)
    pp_rank = groups.rank(groups.pp_group())
    in_flight = simulate.peak_activations(schedule.op_lists(layout.pipeline, num_micro).ranks[pp_rank])
    torch.save({"peak": tracker.peak, "per_stage": per_stage, "in_flight": in_flight, "after": tracker.now(),
                "at_w": made["at_w"], "grad_norm": optimizer.step(LR)}, out / f"activations{pp_rank}.pt")


def node_limited(args, out: Path) -> None:
    initialize_parallel(1, 1, dist.get_world_size())
    results = {}
    for limited in (2, 4):
        config = DSV3Config.preset("tiny", num_experts_per_token=4, num_expert_groups=4, num_limited_groups=limited)
        model = build_model(config, seed=3)
        log: list = []
        record_dispatch(log)
        tokens, _ = global_batch(config.vocab_size)
        with torch.no_grad():
            model(tokens)
        nodes = []
        for kind, *rest in log:
            if kind == "route":
                expert_ids, experts_per_rank = rest
                node_of = expert_ids // experts_per_rank // args.ranks_per_node
                nodes += [len(set(row.tolist())) for row in node_of]
        results[limited] = nodes
        dispatch.TokenDispatcher.permute, dispatch.all_to_all = _ORIGINAL
    torch.save(results, out / f"nodes{dist.get_rank()}.pt")


_ORIGINAL = (dispatch.TokenDispatcher.permute, dispatch.all_to_all)


def pipeline_bytes(args, out: Path) -> None:
    """Count what Megatron's p2p code sends (it batches its sends and receives in batch_isend_irecv)."""
    layout = initialize_parallel(1, 2, 1)
    config = DSV3Config.preset("tiny", **MODEL)
    model = build_model(config, seed=3)
    sent: list[tuple[int, str]] = []
    real_batch = dist.batch_isend_irecv

    def batch_isend_irecv(ops):
        sent.extend((op.tensor.numel() * op.tensor.element_size(), str(op.tensor.dtype))
                    for op in ops if op.op is dist.isend)
        return real_batch(ops)

    dist.batch_isend_irecv = batch_isend_irecv
    tokens, labels = global_batch(config.vocab_size)
    micro, num_micro = 2, GLOBAL_BATCH // 2
    batches = iter([{"tokens": tokens[i * micro:(i + 1) * micro], "labels": labels[i * micro:(i + 1) * micro]}
                    for i in range(num_micro)])
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    stage = ScheduledModel(model, layout.tensor, layout.pipeline, dtype)
    forward_backward(get_schedule("1f1b").forward_backward_func(), [stage], batches, num_micro, micro, SEQ,
                     bf16=args.bf16)
    torch.save({"bytes": sum(n for n, _ in sent), "dtypes": sorted({d for _, d in sent}), "messages": len(sent),
                "hidden": config.hidden_size, "tokens": num_micro * micro * SEQ}, out / f"bytes{dist.get_rank()}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["step", "evaluate", "activations", "node_limited", "pipeline_bytes"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--expert", type=int, default=1)
    parser.add_argument("--ranks-per-node", type=int, default=1)
    parser.add_argument("--optimizer", choices=["local", "distributed"], default="local")
    parser.add_argument("--write-state", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--via-megatron-hook", action="store_true")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(os.environ["DSV3_DIST_TIMEOUT"])))
    try:
        with cpu_shims():
            {"step": step, "evaluate": evaluate, "activations": activations, "node_limited": node_limited,
             "pipeline_bytes": pipeline_bytes}[args.scenario](args, args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
