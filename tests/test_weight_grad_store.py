"""DualPipe's deferred weight gradients (`megatron_dsv3/weight_grad_store.py`): every GEMM that can
defer gives, after its store's W, the gradients autograd gives without one (bit for bit where it runs
the same products), nothing of its weight before W, and its gradient through the weight's autograd
edge, where gradient hooks (Megatron DDP's main_grad accumulation) see it."""
from __future__ import annotations

import pytest
import torch

from megatron_dsv3.fp8 import Fp8Linear, fp8_batched_matmul
from megatron_dsv3.model.moe.experts import RoutedExperts, _grouped_mm_op, _GroupedMatmulFn, bf16_batched_matmul
from megatron_dsv3.weight_grad_store import Linear, WeightGradStore


def _grads(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, store=None, autocast=False, **kwargs):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = module(x, **kwargs)
    if store is None:
        y.backward(dy.to(y.dtype))
    else:
        with store.collecting():
            y.backward(dy.to(y.dtype))
        assert len(store) > 0 and all(p.grad is None for p in module.parameters() if p.dim() > 1)
        store.flush()
        assert len(store) == 0
    return x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("shape", [(6, 8), (2, 3, 8)])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_nn_linear_bit_for_bit_with_or_without_the_store(shape, autocast, bias):
    torch.manual_seed(0)
    ours, reference = Linear(8, 5, bias=bias), torch.nn.Linear(8, 5, bias=bias)
    reference.load_state_dict(ours.state_dict())
    x, dy = torch.randn(shape), torch.randn(*shape[:-1], 5)
    expected = _grads(reference, x, dy, autocast=autocast)
    for store in (None, WeightGradStore()):
        dx, grads = _grads(ours, x, dy, store, autocast=autocast)
        assert torch.equal(dx, expected[0]) and grads.keys() == expected[1].keys()
        assert all(torch.equal(grads[n], expected[1][n]) for n in grads), store


def test_fp8_linear_defers_its_wgrad_to_the_same_gradient():
    torch.manual_seed(1)
    layer = Fp8Linear(256, 128, bias=True)
    x, dy = torch.randn(3, 130, 256), torch.randn(3, 130, 128)
    now, deferred = _grads(layer, x, dy), _grads(layer, x, dy, WeightGradStore())
    assert torch.equal(now[0], deferred[0])
    assert all(torch.equal(now[1][n], deferred[1][n]) for n in now[1])


@pytest.mark.parametrize("matmul", [bf16_batched_matmul, fp8_batched_matmul], ids=["segments", "fp8-per-expert"])
def test_routed_experts_defer_their_gemms_to_the_same_gradients(matmul):
    torch.manual_seed(2)
    experts = RoutedExperts(4, 128, 256, batched_matmul=matmul)
    with torch.no_grad():
        experts.gate_up_weight.normal_(0, 0.05)
        experts.down_weight.normal_(0, 0.05)
    counts = torch.tensor([5, 0, 9, 2])
    x, dy = torch.randn(16, 128), torch.randn(16, 128)
    now = _grads(experts, x, dy, tokens_per_expert=counts)
    deferred = _grads(experts, x, dy, WeightGradStore(), tokens_per_expert=counts)
    assert torch.equal(now[0], deferred[0])
    assert all(torch.equal(now[1][n], deferred[1][n]) for n in now[1])


def test_grouped_matmul_function_forms_torchs_own_products():
    """The CUDA BF16 path's autograd function (torch's grouped GEMM; it also runs on CPU): the
    input and weight gradients autograd forms for the grouped GEMM, deferred or not."""
    op = _grouped_mm_op()
    if op is None:
        pytest.skip("this torch has no grouped matmul")
    torch.manual_seed(3)
    ends = torch.cumsum(torch.tensor([5, 0, 11]), 0, dtype=torch.int32)
    x, w, dy = torch.randn(16, 8), torch.randn(3, 16, 8), torch.randn(16, 16)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    op(x1, w1.transpose(1, 2), offs=ends).backward(dy)
    for store in (None, WeightGradStore()):
        x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = _GroupedMatmulFn.apply(x2, w2, ends)
        if store is None:
            y.backward(dy)
        else:
            with store.collecting():
                y.backward(dy)
            assert w2.grad is None
            store.flush()
        assert torch.equal(x2.grad, x1.grad) and torch.equal(w2.grad, w1.grad)


def test_w_hands_each_gradient_to_the_weights_edge_where_hooks_see_it():
    """As Megatron-Core DDP registers its hook (on the parameter's AccumulateGrad), so here: at B the
    hook finds no gradient; at W it finds the deferred one, and accumulating it into a main_grad
    (what the DDP hook does) gives the gradient autograd would have given. A weight used twice
    (the head, shared by MTP) gets both uses' gradients."""
    torch.manual_seed(4)
    layer = Linear(8, 8, bias=False)
    weight = layer.weight
    weight.main_grad = torch.zeros_like(weight)
    seen = []

    def ddp_hook(*_):
        seen.append(weight.grad is not None)
        if weight.grad is not None:
            weight.main_grad.add_(weight.grad)
            weight.grad = None

    accumulate = weight.expand_as(weight).grad_fn.next_functions[0][0]
    accumulate.register_hook(ddp_hook)
    x = torch.randn(4, 8)
    store = WeightGradStore()
    with store.collecting():
        layer(layer(x)).sum().backward()
    assert seen == [False]  # B: autograd reached the weight's edge with no gradient
    store.flush()
    assert seen == [False, True, True]
    reference = torch.nn.Linear(8, 8, bias=False)
    reference.weight.data.copy_(weight.data)
    reference(reference(x)).sum().backward()
    torch.testing.assert_close(weight.main_grad, reference.weight.grad, rtol=1e-6, atol=1e-7)


def test_no_store_no_deferral_and_no_graph_at_w():
    """Outside `collecting()` a backward computes every weight gradient at once; W's GEMMs run as
    inside a backward, recording no graph although the inputs they read require gradients."""
    layer = Linear(4, 4)
    layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert layer.weight.grad is not None
    layer.zero_grad(set_to_none=True)
    store = WeightGradStore()
    with store.collecting():
        layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert layer.weight.grad is None and any(t.requires_grad for t in store.tensors())
    store.flush()
    assert layer.weight.grad is not None and not layer.weight.grad.requires_grad
