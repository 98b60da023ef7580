"""Fp8Linear, grouped FP8 for experts and apply_fp8 (report sections 3.3.1 and 3.3.3)."""
import pytest
import torch
from torch import nn

from megatron_dsv3.fp8 import (Fp8Linear, apply_fp8, dequantize_tiles, fp8_batched_matmul, fp8_gemm,
                               quantize_blocks, quantize_tiles)
from megatron_dsv3.model.moe.experts import RoutedExperts

# Each GEMM multiplies two E4M3-rounded operands (RMS relative rounding error ~2.5% each), so
# outputs and gradients land at ~3.6% relative Frobenius error (measured 3.5-3.7%); bound 5%.
FP8_REL_TOL = 0.05


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _run(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y, x.grad


@pytest.mark.parametrize("shape,in_f,out_f", [((4, 96, 384), 384, 300), ((50, 130), 130, 77)])
def test_fp8_linear_output_and_grads_match_fp32_linear(shape, in_f, out_f):
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f)
    fp8 = Fp8Linear(in_f, out_f)
    fp8.load_state_dict(ref.state_dict())
    x = torch.randn(*shape)
    dy = torch.randn(*shape[:-1], out_f)
    y, dx = _run(fp8, x, dy)
    y_ref, dx_ref = _run(ref, x, dy)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert _rel(y, y_ref) < FP8_REL_TOL
    assert _rel(dx, dx_ref) < FP8_REL_TOL
    assert _rel(fp8.weight.grad, ref.weight.grad) < FP8_REL_TOL
    torch.testing.assert_close(fp8.bias.grad, ref.bias.grad)  # bias grad is a plain FP32 sum of dy


def test_fp8_linear_gemms_follow_the_tile_block_contract():
    """Fprop, Dgrad and Wgrad equal fp8_gemm on the stated quantisations, bit for bit."""
    torch.manual_seed(1)
    lin = Fp8Linear(256, 192, bias=False)
    x, dy = torch.randn(160, 256), torch.randn(160, 192)
    y, dx = _run(lin, x, dy)
    w_q = quantize_blocks(lin.weight.detach())
    torch.testing.assert_close(y, fp8_gemm(*quantize_tiles(x), *w_q), rtol=0, atol=0)
    dgrad = fp8_gemm(*quantize_tiles(dy), w_q[0].t(), w_q[1].t())  # W^T reuses W's 128x128 blocks
    torch.testing.assert_close(dx, dgrad, rtol=0, atol=0)
    wgrad = fp8_gemm(*quantize_tiles(dy.t()), *quantize_tiles(x.t()))  # 1x128 tiles along tokens
    torch.testing.assert_close(lin.weight.grad, wgrad, rtol=0, atol=0)


def test_activation_saved_for_backward_is_fp8_not_the_input():
    lin = Fp8Linear(256, 128)
    x = torch.randn(2, 64, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    fp8_saved = [t for t in saved if t.dtype == torch.float8_e4m3fn]
    assert any(t.numel() == x.numel() for t in fp8_saved), "FP8 copy of the activation not saved"
    wide = [t for t in saved if t.dtype != torch.float8_e4m3fn and t.numel() >= x.numel() // 64]
    assert not wide, f"high-precision tensors saved: {[(t.dtype, tuple(t.shape)) for t in wide]}"
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_power_of_two_option_saves_power_of_two_scales():
    lin = Fp8Linear(256, 128, power_of_two=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lin(torch.randn(130, 256) * 3.3)
    act_scales = [t for t in saved if t.dtype == torch.float32 and t.shape == (256, 2)]  # x^T tiles over 130 tokens
    assert act_scales and torch.equal(torch.log2(act_scales[0]), torch.log2(act_scales[0]).round())


def test_bf16_master_weight_and_dtype_preserved():
    lin = Fp8Linear(256, 256, dtype=torch.bfloat16)
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    y = lin(x)
    y.float().square().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16
    assert lin.weight.dtype == lin.weight.grad.dtype == torch.bfloat16


def test_fp8_grouped_expert_gemms_match_per_expert_mm_forward_and_backward():
    """Each expert's block of rows (a multiple of 128, one block empty) against its own mm."""
    torch.manual_seed(2)
    rows = [128, 0, 256, 128]
    x = torch.randn(sum(rows), 256)
    w = torch.randn(4, 200, 256) * 0.05
    dy = torch.randn(sum(rows), 200)
    per_expert = lambda a, b, r: torch.cat([a_e @ b_e.t() for a_e, b_e in zip(a.split(r), b)])  # noqa: E731
    outs = []
    for fn in (fp8_batched_matmul.grouped, per_expert):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi, rows)
        y.backward(dy)
        outs.append((y, xi.grad, wi.grad))
    for got, ref in zip(*outs):
        assert got.shape == ref.shape and _rel(got, ref) < FP8_REL_TOL
    assert outs[0][2][1].abs().sum() == 0  # the empty expert's weight gets no gradient


def test_fp8_batched_matmul_plugs_into_routed_experts():
    torch.manual_seed(3)
    ref = RoutedExperts(4, 128, 64)
    fp8 = RoutedExperts(4, 128, 64, batched_matmul=fp8_batched_matmul)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.05)
    fp8.load_state_dict(ref.state_dict())
    x, counts = torch.randn(40, 128), torch.tensor([10, 0, 25, 5])
    y, y_ref = fp8(x, counts), ref(x, counts)
    y.sum().backward()
    assert _rel(y, y_ref) < 2 * FP8_REL_TOL  # two chained FP8 GEMMs
    assert fp8.gate_up_weight.grad is not None and torch.isfinite(fp8.down_weight.grad).all()


class _Block(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(h)
        self.q_proj, self.o_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.mlp = nn.ModuleDict({"gate": nn.Linear(h, 4, bias=False),  # MoE router
                                  "gate_proj": nn.Linear(h, 2 * h), "down_proj": nn.Linear(2 * h, h)})

    def forward(self, x):
        h = self.input_layernorm(x)
        h = x + self.o_proj(torch.tanh(self.q_proj(h)))
        route = torch.softmax(self.mlp["gate"](h), -1).max(-1, keepdim=True).values
        return h + route * self.mlp["down_proj"](torch.relu(self.mlp["gate_proj"](h)))


class _TinyLM(nn.Module):
    def __init__(self, vocab=50, h=128):
        super().__init__()
        self.embedding = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList([_Block(h), _Block(h)])
        self.final_norm = nn.LayerNorm(h)
        self.output_layer = nn.Linear(h, vocab, bias=False)

    def forward(self, tokens):
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output_layer(self.final_norm(x))


def test_apply_fp8_swaps_gemms_and_keeps_head_router_norms_and_parameters():
    torch.manual_seed(4)
    model = _TinyLM()
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    replaced = apply_fp8(model)
    assert sorted(replaced) == sorted(f"layers.{i}.{m}" for i in range(2)
                                      for m in ("q_proj", "o_proj", "mlp.gate_proj", "mlp.down_proj"))
    assert type(model.output_layer) is nn.Linear and type(model.layers[0].mlp["gate"]) is nn.Linear
    assert isinstance(model.layers[1].mlp["down_proj"], Fp8Linear)
    assert model.layers[0].o_proj.power_of_two and not model.layers[0].q_proj.power_of_two
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert apply_fp8(model) == []  # idempotent

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 50, (4, 32))
    loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    w0 = model.layers[0].q_proj.weight.detach().clone()
    opt.step()
    assert not torch.equal(w0, model.layers[0].q_proj.weight)


def test_dequantised_saved_activation_is_close_to_input():
    """The FP8 activation cache loses no more than E4M3 rounding (2^-4 relative per element)."""
    x = torch.randn(300, 256)
    q, s = quantize_tiles(x.t())
    assert ((dequantize_tiles(q, s).t() - x).abs() <= 2 ** -4 * x.abs() + 2 ** -10 * s.max()).all()


def test_apply_fp8_on_the_dsv3_model_keeps_embedding_head_and_router_in_high_precision():
    from megatron_dsv3 import DSV3Config, build_model

    model = build_model(DSV3Config.preset("tiny"))
    replaced = apply_fp8(model)
    assert not isinstance(model.lm_head, Fp8Linear) and type(model.embed_tokens) is nn.Embedding
    assert not any("lm_head" in n or "router" in n or "norm" in n for n in replaced)
    assert isinstance(model.layers["0"].self_attn.kv_b_proj, Fp8Linear)
    assert isinstance(model.layers["1"].mlp.shared_experts.down_proj, Fp8Linear)
    assert model.layers["0"].self_attn.o_proj.power_of_two
