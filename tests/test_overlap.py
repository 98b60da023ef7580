"""DualPipe's overlapped F&B step (pipeline/overlap.py, report Figure 4): a stage's forward cut
into pieces computes what the plain forward and backward compute, one micro-batch's forward
interleaved with another's backward gives the same gradients, and under expert parallelism the
pieces are issued in the order the module docstring's table names (compute of one micro-batch
beside the all-to-all of the other). On CUDA, communication pieces run on their own stream."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from megatron_dsv3 import DSV3Config, build_model
from megatron_dsv3.model.moe.experts import RoutedExperts
from megatron_dsv3.weight_grad_store import Linear
from megatron_dsv3.pipeline.overlap import Segmented, Step, Streams, interleave, run_chain, run_pair
from megatron_dsv3.pipeline.pieces import COMM, COMPUTE, fuse, stage_pieces

MODEL = dict(mtp_num_modules=1, mtp_loss_weight=0.3, seq_aux_loss_coeff=0.01)


def batches(vocab: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    data = [torch.randint(0, vocab, (2, 17), generator=g) for _ in range(count)]
    return [(d[:, :-1], d[:, 1:]) for d in data]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def gemm_weights(model: torch.nn.Module) -> set[str]:
    """Names of the weights of the GEMMs whose gradient DualPipe's W defers: linears and routed experts."""
    return {f"{name}.{p}" if name else p for name, module in model.named_modules()
            for p, _ in module.named_parameters(recurse=False)
            if isinstance(module, (Linear, RoutedExperts)) and p != "bias"}


def plain_step(model, data, device) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference: each micro-batch's plain forward, one backward of their summed losses."""
    outs = [model(t.to(device), labels=l.to(device)) for t, l in data]
    sum(o.loss for o in outs).backward()
    return [float(o.loss) for o in outs], grads(model)


def uncut_kinds(cut):
    """The stage's pieces with their kinds alternated, so that none fuse and every boundary is a cut
    (one process has no all-to-all, so its dispatch and combine would fuse with their neighbours)."""
    pieces = [dataclasses.replace(p, kind=COMM if i % 2 else COMPUTE) for i, p in enumerate(cut.pieces)]
    return dataclasses.replace(cut, pieces=pieces)


class Pass:
    """One micro-batch through `Segmented`, as ModelChunk drives it, with its output kept."""

    def __init__(self, model, tokens, labels, streams, cut_everywhere: bool):
        cut = stage_pieces(model, tokens, labels=labels)
        self.segmented = Segmented(uncut_kinds(cut) if cut_everywhere else cut, streams)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def forward_steps(self) -> list[Step]:
        return self.segmented.forward_steps(lambda: None, lambda output: setattr(self, "output", output))

    def backward_steps(self, split: bool) -> list[Step]:
        return self.segmented.backward_steps(lambda: (self.output.loss, None), self.params, split, lambda: None)


def overlapped_step(model, data, device, split_last: bool, on_step=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """F(0); F(1) & B(0) as one interleaved pair; B(1), its weight gradients deferred when `split_last`."""
    streams = Streams(device)
    passes = [Pass(model, t.to(device), l.to(device), streams, cut_everywhere=True) for t, l in data]
    run_chain(passes[0].forward_steps(), streams)
    run_pair(passes[1].forward_steps(), passes[0].backward_steps(split=False), streams, on_step)
    run_chain(passes[1].backward_steps(split=split_last), streams)
    if split_last:
        passes[1].segmented.weight_grad()
    return [float(p.output.loss) for p in passes], grads(model)


def assert_same_step(got, ref, on_cpu: bool = True) -> None:
    """Losses bit for bit on CPU (the forward is the same operations in the same order); gradients
    up to the order in which gradients from several readers are summed (and, on CUDA, to kernels
    such as attention's backward that need not be deterministic)."""
    (losses, g), (ref_losses, ref_g) = got, ref
    if on_cpu:
        assert losses == ref_losses
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    assert set(g) == set(ref_g)
    rtol, atol = (1e-5, 1e-7) if on_cpu else (1e-4, 1e-6)
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("split", [False, True])
def test_a_stage_cut_at_every_piece_computes_the_plain_gradients(recompute, split):
    """Forward piece by piece, backward piece by piece (B then deferred W when split), every piece
    boundary an autograd cut: the loss bitwise, every parameter's gradient as the plain backward's."""
    config = DSV3Config.preset("tiny", **MODEL)
    (tokens, labels), = batches(config.vocab_size, 1)
    ref_model, model = build_model(config, seed=1), build_model(config, seed=1)
    for m in (ref_model, model):
        m.recompute = recompute
    ref = plain_step(ref_model, [(tokens, labels)], torch.device("cpu"))
    run = Pass(model, tokens, labels, Streams(torch.device("cpu")), cut_everywhere=True)
    assert len(fuse(run.segmented.stage_pieces.pieces)) > 10  # really cut: attention, route, dispatch, ... each alone
    run_chain(run.forward_steps(), run.segmented.streams)
    run_chain(run.backward_steps(split), run.segmented.streams)
    if split:  # B gave no GEMM weight its gradient yet (norms, the embedding and the router may have theirs)
        assert len(run.segmented.store) > 0 and not gemm_weights(model) & grads(model).keys()
        run.segmented.weight_grad()
    assert_same_step(([float(run.output.loss)], grads(model)), ref)


def test_cut_pieces_keep_no_activation_that_autograd_does_not_save():
    """After a forward cut at every piece, every tensor a piece wrote is either freed or saved by
    autograd for backward (or is the loss): the cuts hold no activation of their own."""
    import gc
    import weakref

    config = DSV3Config.preset("tiny", **MODEL)
    (tokens, labels), = batches(config.vocab_size, 1)
    model = build_model(config, seed=1)
    run = Pass(model, tokens, labels, Streams(torch.device("cpu")), cut_everywhere=True)
    written: list = []
    for piece in run.segmented.pieces:
        def recording(state, inner=piece.run):
            out = inner(state)
            written.extend(weakref.ref(v) for v in out.values() if isinstance(v, torch.Tensor))
            return out
        piece.run = recording
    saved: set = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.add(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        run_chain(run.forward_steps(), run.segmented.streams)
    gc.collect()
    alive = [ref() for ref in written if ref() is not None]
    assert len(written) > 40 and len(alive) < len(written)  # some outputs were freed (not saved)
    loss = run.output.loss.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() in saved | {loss} for t in alive)


def test_interleave_pairs_compute_of_one_chain_with_communication_of_the_other():
    forward = [Step(k, lambda: None, f"F{i}") for i, k in enumerate([COMPUTE, COMM, COMPUTE, COMM, COMPUTE])]
    backward = [Step(k, lambda: None, f"B{i}") for i, k in enumerate([COMPUTE, COMM, COMPUTE, COMM, COMPUTE])]
    order = [s.name for s in interleave(forward, backward)]
    # B0 alone (both chains start with compute), then compute beside communication, compute first
    assert order == ["B0", "F0", "B1", "B2", "F1", "F2", "B3", "B4", "F3", "F4"]
    assert sorted(order) == sorted(s.name for s in forward + backward)


def test_f_and_b_pair_equals_forward_then_backward():
    """F(1) interleaved with B(0), then B(1) with its weight gradients deferred: losses and every
    gradient as the plain forward and backward of both micro-batches."""
    config = DSV3Config.preset("tiny", **MODEL)
    data = batches(config.vocab_size, 2)
    ref = plain_step(build_model(config, seed=1), data, torch.device("cpu"))
    issued: list[Step] = []
    got = overlapped_step(build_model(config, seed=1), data, torch.device("cpu"), split_last=True,
                          on_step=issued.append)
    assert_same_step(got, ref)
    kinds = [s.kind for s in issued]
    assert kinds.count(COMM) > 4 and any(a != b for a, b in zip(kinds, kinds[1:]))


# ------------------------------------------------------------------------------ EP2 on gloo
def _ep2_rank(out_dir: str) -> None:
    """Two expert-parallel ranks, each its own micro-batches: the real pieces (all-to-all =
    communication), the pair's issue order, and the gradients of the plain step."""
    import datetime

    import torch.distributed as dist

    from megatron_dsv3.parallel import initialize_parallel

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    initialize_parallel(1, 1, 2, timeout_s=60)
    rank = dist.get_rank()
    config = DSV3Config.preset("tiny", **MODEL)
    data = batches(config.vocab_size, 2, seed=10 + rank)
    cpu = torch.device("cpu")
    ref = plain_step(build_model(config, seed=1), data, cpu)

    model = build_model(config, seed=1)
    streams = Streams(cpu)
    passes = [Pass(model, t, l, streams, cut_everywhere=False) for t, l in data]
    run_chain(passes[0].forward_steps(), streams)
    forward, backward = passes[1].forward_steps(), passes[0].backward_steps(split=False)
    chain = {id(s): "F" for s in forward} | {id(s): "B" for s in backward}
    issued: list[tuple[str, str, str]] = []
    run_pair(forward, backward, streams, on_step=lambda s: issued.append((chain[id(s)], s.kind, s.name)))
    run_chain(passes[1].backward_steps(split=True), streams)
    passes[1].segmented.weight_grad()
    assert_same_step(([float(p.output.loss) for p in passes], grads(model)), ref)

    # A stage's chain alternates compute and communication: 2 MoE layers + MTP's = 3 x (dispatch, combine)
    assert [s.kind for s in forward] == [COMPUTE, COMM] * 6 + [COMPUTE]
    assert [s.name for s in forward if s.kind == COMM] == ["dispatch", "combine"] * 3
    # Every all-to-all is issued right after the other chain's compute, as the table in overlap.py
    # pairs them: attention F | combine B, experts B | dispatch F, experts F | dispatch B,
    # attention B | combine F (a compute step that ends with the router is an attention step).
    pairs = [(a, b) for a, b in zip(issued, issued[1:]) if a[1] == COMPUTE and b[1] == COMM and a[0] != b[0]]
    assert len(pairs) == 12 and issued[0][0] == "B" and issued[-1][0] == "F"
    for (chain, _, compute), (_, _, communication) in pairs:
        assert {"route": "combine", "experts": "dispatch"}[compute.split("+")[-1]] == communication, (chain, compute)
    assert {(a[0], a[2].split("+")[-1]) for a, _ in pairs} == {("F", "route"), ("B", "route"), ("F", "experts"),
                                                               ("B", "experts")}
    Path(out_dir, f"rank{rank}.ok").write_text("ok")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ep2_pair_issues_the_tables_order_and_equals_the_plain_step(tmp_path):
    from helpers.distributed import run_ranks

    run_ranks(2, [__file__, "ep2", str(tmp_path)], timeout=150)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]


# ----------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the streams exist only there")
def test_on_cuda_communication_pieces_run_on_their_own_stream():
    device = torch.device("cuda")
    config = DSV3Config.preset("tiny", **MODEL)
    data = batches(config.vocab_size, 2)
    ref = plain_step(build_model(config, seed=1).to(device), data, device)
    model = build_model(config, seed=1).to(device)
    seen: dict[str, set] = {COMPUTE: set(), COMM: set()}
    original = Streams.run

    def recording(self, step, chain):
        inner = step.run
        step.run = lambda: (seen[step.kind].add(torch.cuda.current_stream().cuda_stream), inner())
        original(self, step, chain)

    Streams.run = recording
    try:
        got = overlapped_step(model, data, device, split_last=True)
    finally:
        Streams.run = original
    torch.cuda.synchronize()
    assert seen[COMM] and seen[COMPUTE] and not seen[COMM] & seen[COMPUTE]
    assert_same_step(got, ref, on_cpu=False)


if __name__ == "__main__" and sys.argv[1] == "ep2":
    _ep2_rank(sys.argv[2])
