"""Routed experts without padding (issue 17): each expert's GEMMs run on its own segment of the
sorted tokens. The reference is the former path, which zero-padded every expert to the most loaded
one's count ([experts, capacity, hidden]) and ran two batched matmuls; it lives here, not in the model.

Run directly (`python tests/test_experts_grouped.py ep2 OUT`) this file is one rank of the EP2 check.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3 import DSV3Config, build_model
from megatron_dsv3.model.moe.dispatch import TokenDispatcher
from megatron_dsv3.model.moe.experts import RoutedExperts, SegmentMatmul
from megatron_dsv3.model.moe.layer import DeepSeekMoE

HIDDEN, FFN, EXPERTS = 32, 24, 6
ROUTINGS = {  # tokens per expert
    "balanced": [5, 5, 5, 5, 5, 5],
    "skewed": [1, 2, 40, 3, 1, 3],
    "empty experts": [0, 17, 0, 0, 13, 0],
}


def padded_reference(experts: RoutedExperts, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The pre-issue-17 path: every expert padded to the largest count, two torch.bmm."""
    E = experts.num_local_experts
    capacity = int(counts_E.max())
    expert_of_token = torch.repeat_interleave(torch.arange(E), counts_E)
    first_of_expert = torch.cumsum(counts_E, 0) - counts_E
    slot = expert_of_token * capacity + torch.arange(x_NH.shape[0]) - first_of_expert[expert_of_token]
    padded_ECH = x_NH.new_zeros(E * capacity, x_NH.shape[1]).index_copy(0, slot, x_NH).view(E, capacity, -1)
    gate, up = torch.bmm(padded_ECH, experts.gate_up_weight.transpose(1, 2)).chunk(2, dim=-1)
    out_ECH = torch.bmm(F.silu(gate) * up, experts.down_weight.transpose(1, 2))
    return out_ECH.flatten(0, 1).index_select(0, slot)


def make_experts(seed: int = 0, experts: int = EXPERTS) -> RoutedExperts:
    module = RoutedExperts(experts, HIDDEN, FFN)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def forward_and_grads(fn, module: RoutedExperts, x: torch.Tensor, dy: torch.Tensor):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad, module.gate_up_weight.grad, module.down_weight.grad


def assert_all_close(got, ref, names=("output", "input grad", "gate_up grad", "down grad"), **tol):
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("routing", ROUTINGS, ids=list(ROUTINGS))
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "selective-recompute"])
def test_segments_equal_the_padded_reference_forward_and_every_gradient(routing, recompute):
    counts = torch.tensor(ROUTINGS[routing])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(int(counts.sum()), HIDDEN, generator=g)
    dy = torch.randn(int(counts.sum()), HIDDEN, generator=g)
    experts = make_experts()
    experts.selective_recompute = recompute
    got = forward_and_grads(lambda x_: experts(x_, counts), experts, x, dy)
    ref = forward_and_grads(lambda x_: padded_reference(experts, x_, counts), experts, x, dy)
    assert_all_close(got, ref, rtol=1e-5, atol=1e-6)
    for e in torch.nonzero(counts == 0).flatten().tolist():  # an expert without tokens: zero gradient
        assert torch.count_nonzero(got[2][e]) == 0 and torch.count_nonzero(got[3][e]) == 0


def test_a_plain_batched_callable_runs_once_per_segment_on_its_rows_only():
    counts = torch.tensor(ROUTINGS["skewed"])
    x = torch.randn(int(counts.sum()), HIDDEN)
    seen = []

    def bmm(x_ECK, w_ENK):
        seen.append(tuple(x_ECK.shape[:2]))
        return torch.bmm(x_ECK, w_ENK.transpose(1, 2))

    plain, experts = RoutedExperts(EXPERTS, HIDDEN, FFN, batched_matmul=bmm), make_experts()
    plain.load_state_dict(experts.state_dict())
    torch.testing.assert_close(plain(x, counts), experts(x, counts), rtol=1e-5, atol=1e-6)
    assert seen == [(1, n) for n in counts.tolist()] * 2  # gate_up, then down: never the largest count


def test_bf16_autocast_runs_the_segments_in_bf16_like_the_reference():
    counts = torch.tensor(ROUTINGS["skewed"])
    x, dy = torch.randn(int(counts.sum()), HIDDEN), torch.randn(int(counts.sum()), HIDDEN)
    experts = make_experts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = forward_and_grads(lambda x_: experts(x_, counts), experts, x, dy)
        ref = forward_and_grads(lambda x_: padded_reference(experts, x_, counts), experts, x, dy)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    assert got[2].dtype == torch.float32  # master weights keep their dtype
    assert_all_close(got, ref, rtol=2e-2, atol=2e-2)


def test_grouped_mm_call_matches_the_segment_loop(monkeypatch):
    """The GPU path's contract, checked on CPU: torch's grouped matmul over the segment ends
    (computed on the device) gives the loop's output and gradients (non-stride-0 output grads:
    torch's CPU backward refuses stride 0)."""
    counts = torch.tensor(ROUTINGS["empty experts"])
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(int(counts.sum()), HIDDEN, generator=g), torch.randn(int(counts.sum()), HIDDEN, generator=g)
    experts = make_experts()
    loop = forward_and_grads(lambda x_: experts(x_, counts), experts, x, dy)
    monkeypatch.setattr(SegmentMatmul, "uses_grouped_mm", staticmethod(lambda x_, w_: True))
    monkeypatch.setattr(counts, "tolist", lambda: pytest.fail("the grouped path must not read the counts on the host"),
                        raising=False)
    grouped = forward_and_grads(lambda x_: experts(x_, counts), experts, x, dy)
    assert_all_close(grouped, loop, rtol=1e-5, atol=1e-6)


def test_grouped_mm_is_chosen_only_for_bf16_cuda_tensors_with_aligned_rows():
    w = torch.zeros(2, 16, 32)
    assert not SegmentMatmul.uses_grouped_mm(torch.zeros(4, 32), w)  # CPU
    assert not SegmentMatmul.uses_grouped_mm(torch.zeros(4, 32, dtype=torch.bfloat16), w)  # CPU, BF16
    cuda_bf16 = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(4, 32))
    assert SegmentMatmul.uses_grouped_mm(cuda_bf16, w)
    assert not SegmentMatmul.uses_grouped_mm(types.SimpleNamespace(is_cuda=True, dtype=torch.float32, shape=(4, 32)), w)
    assert not SegmentMatmul.uses_grouped_mm(cuda_bf16, torch.zeros(2, 12, 32))  # N * 2 bytes not 16-byte aligned


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch's grouped GEMM, BF16)")
def test_gpu_dispatch_and_grouped_experts_run_without_host_syncs_and_match_the_cpu_loop():
    counts = torch.tensor(ROUTINGS["skewed"])
    ids = torch.repeat_interleave(torch.arange(EXPERTS), counts)[torch.randperm(int(counts.sum()))].view(-1, 2)
    x = torch.randn(ids.shape[0], HIDDEN)
    cpu = make_experts()
    gpu = make_experts().cuda()
    x_gpu, ids_gpu = x.cuda().bfloat16().requires_grad_(), ids.cuda()
    dispatcher = TokenDispatcher(EXPERTS, None, None)
    assert SegmentMatmul.uses_grouped_mm(x_gpu, gpu.gate_up_weight.bfloat16())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = dispatcher.run(x_gpu, ids_gpu, gpu)
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = dispatcher.run(x, ids, cpu)
    torch.testing.assert_close(out.float().cpu(), ref.detach(), rtol=3e-2, atol=3e-2)
    assert torch.isfinite(gpu.gate_up_weight.grad).all() and gpu.gate_up_weight.grad.dtype == torch.float32


def _padded_forward(self, x_NH, counts_E, rows_per_expert=None):
    return padded_reference(self, x_NH, counts_E)


@pytest.mark.parametrize("bias", ["balanced", "skewed"])
def test_moe_layer_under_forced_routing_equals_the_padded_reference(bias):
    """The whole DeepSeekMoE layer (router, dispatch, experts, shared experts, balance loss),
    routing forced through the bias: all tokens onto 2 of 8 experts when skewed."""
    config = DSV3Config.preset("tiny", seq_aux_loss_coeff=1e-3)
    runs = []
    for padded in (False, True):
        torch.manual_seed(3)
        layer = DeepSeekMoE(config, layer_number=1).train()
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.05)
        if bias == "skewed":
            layer.router.expert_bias[[1, 6]] = 10.0
        if padded:
            layer.experts.forward = types.MethodType(_padded_forward, layer.experts)
        x = torch.randn(2, 24, config.hidden_size, generator=torch.Generator().manual_seed(4), requires_grad=True)
        layer(x).square().sum().backward()
        runs.append({"out": layer(x).detach(), "x": x.grad,
                     **{n: p.grad for n, p in layer.named_parameters()}})
    load = runs[0]["experts.gate_up_weight"].flatten(1).count_nonzero(1)
    if bias == "skewed":
        assert load.nonzero().flatten().tolist() == [1, 6]  # the routing really was skewed
    for name, ref in runs[1].items():
        torch.testing.assert_close(runs[0][name], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_small_preset_builds_and_trains_one_step():
    config = DSV3Config.preset("small", num_routed_experts=8, num_layers=2, vocab_size=512)  # cheap: same widths
    small = DSV3Config.preset("small")
    assert (small.hidden_size, small.num_routed_experts, small.num_experts_per_token, small.num_shared_experts,
            small.q_lora_rank) == (384, 64, 6, 2, 0)
    lite = DSV3Config.preset("deepseek-v3-lite")
    for field in ("moe_ffn_hidden_size", "kv_lora_rank", "dense_ffn_hidden_size"):  # lite's ratios to hidden
        assert abs(getattr(small, field) / small.hidden_size - getattr(lite, field) / lite.hidden_size) < 0.01, field
    model = build_model(config, seed=0).train()
    tokens = torch.randint(0, config.vocab_size, (2, 33))
    loss = model(tokens[:, :-1], labels=tokens[:, 1:]).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                        for p in model.parameters())


# ---------------------------------------------------------------------------------------- EP2
EP_TOKENS, EP_TOPK = 20, 2


def _ep2_rank(out_dir: str) -> None:
    """Rank r of 2 holds experts [3r, 3r+3) and its own tokens; its outputs and gradients are
    compared with a one-process padded reference over both ranks' tokens and all experts."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    full = make_experts(seed=5)
    local = RoutedExperts(EXPERTS // 2, HIDDEN, FFN)
    with torch.no_grad():
        local.gate_up_weight.copy_(full.gate_up_weight[3 * rank:3 * rank + 3])
        local.down_weight.copy_(full.down_weight[3 * rank:3 * rank + 3])
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(EP_TOKENS, HIDDEN, generator=g) for _ in range(2)]
    # rank 0's tokens skewed onto experts 1 and 2 (expert 0 empty there); no token of either rank picks expert 4
    ids = [torch.tensor([[1, 2]] * (EP_TOKENS - 2) + [[3, 5], [2, 5]]),
           torch.tensor([[0, 3], [1, 5], [2, 3], [0, 5]] * (EP_TOKENS // 4))]
    dys = [torch.randn(EP_TOKENS, EP_TOPK, HIDDEN, generator=g) for _ in range(2)]

    x = xs[rank].clone().requires_grad_()
    out = TokenDispatcher(EXPERTS, dist.group.WORLD, None).run(x, ids[rank], local)
    out.backward(dys[rank])

    ref_x = [xi.clone().requires_grad_() for xi in xs]
    single = TokenDispatcher(EXPERTS, None, None)
    full.forward = types.MethodType(_padded_forward, full)
    refs = [single.run(xi, ids_i, full) for xi, ids_i in zip(ref_x, ids)]
    sum((r * dy).sum() for r, dy in zip(refs, dys)).backward()
    torch.testing.assert_close(out, refs[rank].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_x[rank].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(local.gate_up_weight.grad, full.gate_up_weight.grad[3 * rank:3 * rank + 3],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(local.down_weight.grad, full.down_weight.grad[3 * rank:3 * rank + 3],
                               rtol=1e-5, atol=1e-6)
    if rank == 1:  # expert 4 (this rank's second) got no token from either rank: an exactly zero gradient
        assert torch.count_nonzero(local.gate_up_weight.grad[1]) == 0 and torch.count_nonzero(local.down_weight.grad[1]) == 0
    Path(out_dir, f"rank{rank}.ok").write_text("ok")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ep2_all_to_all_with_segments_equals_the_padded_reference(tmp_path):
    from helpers.distributed import run_ranks

    run_ranks(2, [__file__, "ep2", str(tmp_path)], timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]


if __name__ == "__main__" and sys.argv[1] == "ep2":
    _ep2_rank(sys.argv[2])
