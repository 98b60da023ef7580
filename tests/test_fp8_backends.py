"""FP8 backends' CPU contracts: torch API detection, the TE wiring, the deferred overflow check,
FP32 promotion under BF16 autocast and the per-expert padded grouped GEMM (report section 3.3)."""
import contextlib
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megatron_dsv3.fp8 import (FP8RangeError, Fp8Linear, apply_fp8, blockwise_scaled_mm_api, expert_gemm_rows,
                               fp8_batched_matmul, fp8_gemm, fp8_matmul, quantize_blocks, quantize_tiles, raise_deferred_overflow)
from megatron_dsv3.fp8 import backends, quantize
from megatron_dsv3.model.moe.experts import RoutedExperts

FP8_REL_TOL = 0.05  # as in test_fp8_linear: two E4M3-rounded operands per GEMM, ~3.6% measured


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.fixture(autouse=True)
def _fresh_overflow_ledger(monkeypatch):
    monkeypatch.setattr(quantize, "_pending_nonfinite", {})


# --- torch's blockwise scaled matmul, detected by feature -------------------------------------------

def _enum(*names):
    return type("ScalingType", (), {n: f"member:{n}" for n in names})


@pytest.mark.parametrize("tile_name,block_name", [("BlockWise1x128", "BlockWise128x128"),
                                                  ("BLOCKWISE_1X128", "BLOCKWISE_128X128"),
                                                  ("Blockwise1x128", "Blockwise128x128")])
def test_detection_finds_f_scaled_mm_blockwise_members_however_spelled(tile_name, block_name):
    functional = SimpleNamespace(scaled_mm=lambda *a, **k: None, ScalingType=_enum("TensorWise", tile_name, block_name))
    apis = backends.blockwise_scaled_mm_apis(functional, SimpleNamespace(_scaled_mm=lambda *a, **k: None))
    assert [api.function for api in apis] == ["F.scaled_mm", "torch._scaled_mm"]  # the probe tries both, in order
    assert (apis[0].tile_1x128, apis[0].block_128x128) == (f"member:{tile_name}", f"member:{block_name}")
    assert blockwise_scaled_mm_api(functional, SimpleNamespace()) == apis[0]


def test_detection_falls_back_to_torch_scaled_mm_without_blockwise_members():
    functional = SimpleNamespace(scaled_mm=lambda *a, **k: None, ScalingType=_enum("TensorWise", "RowWise"))
    api = blockwise_scaled_mm_api(functional, SimpleNamespace(_scaled_mm=lambda *a, **k: None))
    assert api.function == "torch._scaled_mm" and api.tile_1x128 is None
    assert blockwise_scaled_mm_api(SimpleNamespace(), SimpleNamespace(_scaled_mm=lambda: None)).function == "torch._scaled_mm"


def test_detection_returns_none_when_torch_has_no_scaled_matmul():
    assert blockwise_scaled_mm_api(SimpleNamespace(ScalingType=_enum("BlockWise1x128", "BlockWise128x128")),
                                   SimpleNamespace()) is None


def test_detection_on_the_installed_torch_matches_its_attributes():
    api = blockwise_scaled_mm_api()
    if hasattr(torch.nn.functional, "scaled_mm") and hasattr(torch.nn.functional.ScalingType, "BlockWise1x128"):
        assert api.function == "F.scaled_mm" and api.tile_1x128 is torch.nn.functional.ScalingType.BlockWise1x128
    else:
        assert api is None or api.function == "torch._scaled_mm"


# --- Transformer Engine wiring, against a fake `transformer_engine` that records its calls -------------

@pytest.fixture
def fake_te(monkeypatch):
    calls = SimpleNamespace(autocasts=[], linears=[], forwards=[], active=None)

    class Format:
        E4M3, HYBRID = "E4M3", "HYBRID"

    class Float8BlockScaling:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Linear(nn.Module):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__()
            calls.linears.append(dict(in_features=in_features, out_features=out_features, bias=bias,
                                      params_dtype=params_dtype, device=device))
            self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=params_dtype))
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=params_dtype)) if bias else None

        def forward(self, x):
            calls.forwards.append(dict(recipe=calls.active, weight=self.weight, bias=self.bias))
            return nn.functional.linear(x, self.weight, self.bias)

    @contextlib.contextmanager
    def fp8_autocast(enabled=False, fp8_recipe=None):
        calls.autocasts.append(dict(enabled=enabled, recipe=fp8_recipe))
        calls.active = fp8_recipe
        try:
            yield
        finally:
            calls.active = None

    te = types.ModuleType("transformer_engine")
    te.__version__ = "2.3.0"
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    te.pytorch.Linear, te.pytorch.fp8_autocast = Linear, fp8_autocast
    te.common = types.ModuleType("transformer_engine.common")
    te.common.recipe = types.ModuleType("transformer_engine.common.recipe")
    te.common.recipe.Float8BlockScaling, te.common.recipe.Format = Float8BlockScaling, Format
    for name, mod in [("transformer_engine", te), ("transformer_engine.pytorch", te.pytorch),
                      ("transformer_engine.common", te.common), ("transformer_engine.common.recipe", te.common.recipe)]:
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(backends, "_state", {"name": None, "reason": "", "scaled_mm_ok": False, "probe": "no CUDA"})
    # TE needs a GPU, and select_backend asks for one; the stand-in computes on the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls.Float8BlockScaling = Float8BlockScaling
    return calls


def test_te_backend_runs_fp8_linear_through_te_linear_with_float8_block_scaling(fake_te):
    assert backends.select_backend() == "transformer-engine"
    assert "Float8BlockScaling" in backends.describe_backend()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 64, bias=False))
    keys_before = list(model.state_dict())
    apply_fp8(model)
    assert all(isinstance(m, Fp8Linear) for m in model)
    x = torch.randn(3, 256)
    y = model(x)
    assert len(fake_te.forwards) == 2 and len(fake_te.autocasts) == 2
    for autocast, fwd, layer in zip(fake_te.autocasts, fake_te.forwards, model):
        assert autocast["enabled"] is True
        assert isinstance(autocast["recipe"], fake_te.Float8BlockScaling) and fwd["recipe"] is autocast["recipe"]
        assert autocast["recipe"].kwargs == {"fp8_format": "E4M3"}
        assert fwd["weight"] is layer.weight and (fwd["bias"] is layer.bias or layer.bias is None)
    assert fake_te.linears == [dict(in_features=256, out_features=128, bias=True, params_dtype=torch.float32, device="meta"),
                               dict(in_features=128, out_features=64, bias=False, params_dtype=torch.float32, device="meta")]
    y.sum().backward()  # gradients land on the model's own Parameters
    assert model[0].weight.grad is not None and model[1].weight.grad is not None
    assert list(model.state_dict()) == keys_before and len(list(model.parameters())) == 3
    model(x)
    assert len(fake_te.linears) == 2, "the TE Linear is built once per layer, not per call"


def test_te_installed_without_a_visible_gpu_falls_back_to_the_emulation(fake_te, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # e.g. CPU tests on a CUDA host
    assert backends.select_backend() == "emulation"
    assert "no CUDA device for TE" in backends.describe_backend()


def test_without_te_fp8_linear_does_not_touch_transformer_engine(monkeypatch):
    monkeypatch.setattr(backends, "_state", {"name": "emulation", "reason": "test", "scaled_mm_ok": False})
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # any import of it would raise
    Fp8Linear(128, 128)(torch.randn(4, 128)).sum().backward()


# --- no host sync per quantisation; one deferred check names the tensor ------------------------------

def test_fp8_linear_and_experts_do_not_sync_the_host_per_quantisation(monkeypatch):
    torch.manual_seed(0)
    lin = Fp8Linear(256, 256, label="layers.0.mlp.up_proj")
    x = torch.randn(130, 256, requires_grad=True)
    syncs = []
    for method in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *a, _m=method, _o=original, **k: syncs.append(_m) or _o(self, *a, **k))
    lin(x).sum().backward()
    fp8_batched_matmul.grouped(torch.randn(256, 128), torch.randn(2, 64, 128), [128, 128]).sum()
    assert syncs == [], f"host syncs in the FP8 hot path: {syncs}"
    monkeypatch.undo()
    raise_deferred_overflow()  # nothing overflowed: no error


def test_deferred_overflow_check_names_the_tensor_that_overflowed():
    lin = Fp8Linear(256, 64, label="layers.3.self_attention.linear_proj")
    x = torch.randn(8, 256)
    x[2, 5] = float("nan")
    lin(x)  # no error here: the check is deferred
    # one tile of x (Fprop) and one of x^T (kept for Wgrad) hold the NaN
    with pytest.raises(FP8RangeError, match=r"layers\.3\.self_attention\.linear_proj input \(2 tile"):
        raise_deferred_overflow()
    raise_deferred_overflow()  # the ledger was reset


def test_deferred_overflow_names_the_gradient_and_inf_in_a_weight():
    lin = Fp8Linear(128, 128, bias=False, label="head_proj")
    y = lin(torch.randn(4, 128, requires_grad=True))
    dy = torch.ones_like(y)
    dy[0, 0] = float("inf")
    y.backward(dy)
    with pytest.raises(FP8RangeError, match=r"head_proj output gradient"):
        raise_deferred_overflow()
    with torch.no_grad():
        lin.weight[0, 0] = float("-inf")
    lin(torch.randn(4, 128))
    with pytest.raises(FP8RangeError, match=r"head_proj weight \(1 tile\(s\)/block\(s\)\)"):
        raise_deferred_overflow()


def test_standalone_quantisers_still_raise_at_once():
    with pytest.raises(FP8RangeError, match="ckpt.w: 1 non-finite"):
        quantize_blocks(torch.tensor([[1.0, float("nan")]]), name="ckpt.w")


# --- FP32 promotion under BF16 autocast ----------------------------------------------------------

def test_fp8_gemm_keeps_fp32_accumulation_under_bf16_autocast():
    torch.manual_seed(0)
    (qa, sa), (qb, sb) = quantize_tiles(torch.randn(64, 512)), quantize_blocks(torch.randn(96, 512))
    ref = fp8_gemm(qa, sa, qb, sb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fp8_gemm(qa, sa, qb, sb)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, ref, rtol=0, atol=0)


# --- MoE experts: each expert's rows padded to a multiple of 128, one kernel-sized GEMM each ------------

def test_grouped_expert_path_pads_each_expert_below_128_rows_and_matches_unpadded_fp8_gemms(monkeypatch):
    torch.manual_seed(0)
    counts = torch.tensor([1, 0, 129, 300, 7])
    x = torch.randn(int(counts.sum()), 128)
    grouped = RoutedExperts(5, 128, 128, batched_matmul=fp8_batched_matmul)
    for p in grouped.parameters():
        nn.init.normal_(p, std=0.05)
    # each expert's rows as they are, one FP8 GEMM per expert ([1, rows, K] @ [1, N, K]^T)
    unpadded = RoutedExperts(5, 128, 128, batched_matmul=lambda x, w: fp8_matmul(x[0], w[0])[None])
    reference = RoutedExperts(5, 128, 128)  # FP32
    for other in (unpadded, reference):
        other.load_state_dict(grouped.state_dict())

    seen_rows = []
    original = type(fp8_batched_matmul).grouped
    monkeypatch.setattr(type(fp8_batched_matmul), "grouped",
                        lambda self, x_MK, w, rows, **kw: seen_rows.append(list(rows)) or original(self, x_MK, w, rows, **kw))
    monkeypatch.setitem(expert_gemm_rows, "total", 0)
    monkeypatch.setitem(expert_gemm_rows, "kernel", 0)
    outs, grads = [], []
    for experts in (grouped, unpadded, reference):
        xi = x.clone().requires_grad_()
        out = experts(xi, counts)
        out.backward(torch.ones_like(out))
        outs.append(out)
        grads.append((xi.grad, experts.gate_up_weight.grad, experts.down_weight.grad))

    assert seen_rows[0] == [128, 0, 256, 384, 128]
    assert all(r % 128 == 0 and 0 <= r - n < 128 for r, n in zip(seen_rows[0], counts.tolist()))
    assert expert_gemm_rows["total"] == 2 * sum(seen_rows[0]) and expert_gemm_rows["kernel"] == 0  # CPU: emulation
    assert _rel(outs[0], outs[1]) < 1e-5, "padding must not change FP8 tile scales: zeros never raise an amax"
    assert _rel(outs[0], outs[2]) < 2 * FP8_REL_TOL  # two chained FP8 GEMMs
    for g, g_unpadded, g_ref in zip(grads[0], grads[1], grads[2]):
        assert _rel(g, g_unpadded) < 1e-5
        assert _rel(g, g_ref) < 2 * FP8_REL_TOL
    assert torch.count_nonzero(grads[0][1][1]) == 0, "an expert without tokens gets a zero gradient"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_expert_rows_reach_the_kernel_without_host_syncs_and_match_the_cpu_emulation(monkeypatch):
    backend = backends.select_backend()  # the probe syncs once, here
    torch.manual_seed(0)
    counts = torch.tensor([1, 0, 129, 300, 7])
    x = torch.randn(int(counts.sum()), 256)
    cpu = RoutedExperts(5, 256, 256, batched_matmul=fp8_batched_matmul)
    for p in cpu.parameters():
        nn.init.normal_(p, std=0.05)
    gpu = RoutedExperts(5, 256, 256, batched_matmul=fp8_batched_matmul).cuda()
    gpu.load_state_dict(cpu.state_dict())
    monkeypatch.setitem(expert_gemm_rows, "total", 0)
    monkeypatch.setitem(expert_gemm_rows, "kernel", 0)
    out_gpu = gpu(x.cuda(), counts.cuda())
    out_gpu.sum().backward()
    assert expert_gemm_rows["total"] == 2 * (128 + 256 + 384 + 128)
    if backends._scaled_mm_ok():
        assert expert_gemm_rows["kernel"] == expert_gemm_rows["total"], backends.describe_backend()
    monkeypatch.setitem(expert_gemm_rows, "total", 0)
    assert _rel(out_gpu.cpu(), cpu(x, counts)) < 2e-2, backend  # kernel writes BF16, emulation FP32

    lin = Fp8Linear(512, 384, label="sync_probe").cuda()
    xs = torch.randn(256, 512, device="cuda", requires_grad=True)
    lin(xs)  # builds any lazy state before the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        lin(xs).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    raise_deferred_overflow()
