"""megatron_dsv3.compat: each CPU shim does what it says inside `cpu_shims()` and is fully undone on exit;
`build_megatron_config` drops (with a warning) fields the installed Megatron-Core lacks."""
import dataclasses
import types
import warnings

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import random as mpu_random
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_dsv3 import compat
from megatron_dsv3.compat import megatron_cpu
from megatron_dsv3.compat.megatron_api import DroppedConfigFieldWarning, build_megatron_config, config_value
from megatron_dsv3.compat.megatron_cpu import CPURNGStatesTracker, cpu_shims

SHIMS = ["torch.cuda.current_device", "torch.cuda.synchronize",
         "megatron.core.tensor_parallel.random:cpu-rng-tracker", "torch:cuda-factory-redirect"]

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are no-ops where CUDA exists")


@pytest.fixture(autouse=True)
def no_shims_leak():
    assert compat.applied() == []
    yield
    assert compat.applied() == [] and not megatron_cpu.active()


def _originals():
    return (torch.cuda.current_device, torch.cuda.synchronize, mpu_random._CUDA_RNG_STATE_TRACKER,
            mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED, mpu_random._get_cuda_rng_state,
            mpu_random._set_cuda_rng_state, len(torch.overrides._get_current_function_mode_stack()))


def _same(before, after) -> bool:
    return all(a is b for a, b in zip(before[:-1], after[:-1])) and before[-1] == after[-1]


# --------------------------------------------------------------------------- shims
@cpu_only
def test_current_device_and_synchronize_work_inside_and_raise_again_after():
    original_device, original_sync = torch.cuda.current_device, torch.cuda.synchronize
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    with cpu_shims():
        assert compat.applied() == SHIMS
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.cuda.synchronize() is None
    assert torch.cuda.current_device is original_device and torch.cuda.synchronize is original_sync
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.synchronize()


@cpu_only
def test_cuda_placements_land_on_cpu_only_inside():
    x = torch.arange(4.0)
    with cpu_shims():
        placed = [torch.empty(3, device="cuda"), torch.zeros([], device="cuda:0"),
                  torch.tensor([1.0, 2.0], device=torch.device("cuda")), torch.ones(2, device=0),
                  x.cuda(), x.cuda(non_blocking=True), x.to("cuda"), x.to(device="cuda"),
                  x.to(torch.device("cuda", 0), torch.float64), x.new_zeros(3, device="cuda"),
                  torch.empty_like(x, device="cuda")]
        assert all(t.device.type == "cpu" for t in placed)
        assert placed[8].dtype == torch.float64 and torch.equal(placed[4], x)
        assert torch.ones(2).device.type == "cpu"  # untouched calls pass through
    with pytest.raises((AssertionError, RuntimeError)):
        torch.empty(3, device="cuda")
    with pytest.raises((AssertionError, RuntimeError)):
        x.cuda()


@cpu_only
def test_type_names_are_cuda_ones_only_inside_and_only_without_arguments():
    p = torch.nn.Parameter(torch.zeros(2))
    with cpu_shims():
        assert p.type() == "torch.cuda.FloatTensor"  # what the distributed optimizer checks
        assert p.detach().bfloat16().type() == "torch.cuda.BFloat16Tensor"
        converted = p.type(torch.float64)  # a conversion is a conversion, not a name
        assert converted.dtype == torch.float64 and converted.device.type == "cpu"
    assert p.type() == "torch.FloatTensor"


@cpu_only
def test_rng_tracker_forks_on_cpu_states_and_the_original_tracker_comes_back():
    before = _originals()
    with cpu_shims():
        tracker = tensor_parallel.get_cuda_rng_tracker()
        assert isinstance(tracker, CPURNGStatesTracker) and not tracker.is_initialized()
        tracker.add("model-parallel-rng", 1234)
        assert tracker.is_initialized()
        torch.manual_seed(0)
        outside = torch.rand(3)
        torch.manual_seed(0)
        with tracker.fork():
            first = torch.rand(3)
        assert torch.equal(torch.rand(3), outside)  # the default stream did not move
        with tracker.fork():
            second = torch.rand(3)
        assert not torch.equal(first, second)  # the forked stream continues
        replay = CPURNGStatesTracker()
        replay.add("model-parallel-rng", 1234)
        with replay.fork():
            assert torch.equal(torch.rand(3), first)  # same seed, same stream
        with pytest.raises(Exception, match="already exists"):
            tracker.add("other", 1234)
        with pytest.raises(Exception, match="not added"):
            with tracker.fork("missing"):
                pass
        states = tracker.get_states()
        tracker.set_states(states)
        assert tracker.get_states().keys() == {"model-parallel-rng"}
    assert _same(before, _originals())


@cpu_only
def test_megatron_seeding_gpu_style_init_and_recompute_work_under_the_shims():
    """model_parallel_cuda_manual_seed, the GPU init path of VocabParallelEmbedding (which forks
    the tracker) and tensor_parallel.checkpoint (which saves and restores the "CUDA" RNG state)
    all run, and the recomputed dropout mask equals the forward one."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with cpu_shims():
            parallel_state.initialize_model_parallel(1, 1)
            tensor_parallel.model_parallel_cuda_manual_seed(123)
            config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)  # GPU-style init
            embedding = tensor_parallel.VocabParallelEmbedding(16, 8, init_method=config.init_method, config=config)
            assert embedding.weight.device.type == "cpu" and embedding.weight.std() > 0

            weight = torch.randn(4, 4, requires_grad=True)
            x = torch.randn(8, 4, requires_grad=True)

            def dropped(inp):
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    return torch.nn.functional.dropout(inp @ weight, p=0.5, training=True)

            out = tensor_parallel.checkpoint(dropped, False, x)
            out.sum().backward()
            kept = (out != 0).float()  # the forward mask; the gradient must use the same one
            torch.testing.assert_close(weight.grad, x.t() @ (kept * 2.0))
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


# ------------------------------------------------------------------ apply / undo
def test_exit_restores_everything_even_after_an_exception():
    before = _originals()
    with pytest.raises(ValueError):
        with cpu_shims():
            raise ValueError("boom")
    assert compat.applied() == [] and _same(before, _originals())


@cpu_only
def test_nested_use_and_apply_twice_are_safe():
    before = _originals()
    with cpu_shims():
        with cpu_shims():
            assert compat.applied() == SHIMS
        assert compat.applied() == SHIMS  # the inner exit restores nothing
        assert torch.cuda.current_device() == torch.device("cpu")
    assert compat.applied() == [] and _same(before, _originals())

    assert megatron_cpu.apply() == SHIMS
    assert megatron_cpu.apply() == []  # already active: nothing applied twice
    assert len(torch.overrides._get_current_function_mode_stack()) == before[-1] + 1
    megatron_cpu.undo()
    assert compat.applied() == SHIMS
    megatron_cpu.undo()
    megatron_cpu.undo()  # one more than applied: a no-op
    assert compat.applied() == [] and _same(before, _originals())


@cpu_only
def test_a_mode_left_open_inside_does_not_keep_the_redirect_alive():
    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    depth = len(torch.overrides._get_current_function_mode_stack())
    other = Passthrough()
    with pytest.warns(RuntimeWarning, match="TorchFunctionMode"):
        with cpu_shims():
            other.__enter__()
    stack = torch.overrides._get_current_function_mode_stack()
    assert len(stack) == depth + 1 and stack[-1] is other  # theirs stays, ours is gone
    with pytest.raises((AssertionError, RuntimeError)):
        torch.empty(1, device="cuda")
    other.__exit__(None, None, None)
    assert len(torch.overrides._get_current_function_mode_stack()) == depth


# ------------------------------------------------------------------ megatron_api
def _small(**extra):
    return dict(num_layers=2, hidden_size=64, num_attention_heads=4, **extra)


def test_unknown_config_field_is_dropped_with_a_warning_naming_it():
    with pytest.warns(DroppedConfigFieldWarning, match="field_from_a_future_release"):
        config = build_megatron_config(TransformerConfig, **_small(field_from_a_future_release=3, hidden_dropout=0.0))
    assert isinstance(config, TransformerConfig)
    assert config.num_layers == 2 and config.hidden_dropout == 0.0
    assert not hasattr(config, "field_from_a_future_release")


def test_known_fields_build_without_a_drop_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DroppedConfigFieldWarning)
        build_megatron_config(TransformerConfig, **_small())


def test_renamed_yarn_fields_map_to_the_installed_spelling():
    fields = {f.name for f in dataclasses.fields(MLATransformerConfig)}
    assert "rotary_scaling_factor" in fields  # 0.16 spells it without the yarn_ prefix
    with warnings.catch_warnings():
        warnings.simplefilter("error", DroppedConfigFieldWarning)
        config = build_megatron_config(MLATransformerConfig, **_small(yarn_rotary_scaling_factor=4.0,
                                                                      yarn_mscale_all_dim=0.5))
    assert config.rotary_scaling_factor == 4.0 and config.mscale_all_dim == 0.5
    assert config_value(config, "yarn_rotary_scaling_factor") == 4.0
    assert config_value(config, "no_such_field", None) is None
    with pytest.raises(AttributeError, match="no_such_field"):
        config_value(config, "no_such_field")


def test_local_spec_shims_let_megatron_mla_take_k_channels_and_are_undone():
    """megatron-core 0.16's local DotProductAttention refuses MLA's k_channels/v_channels; inside the
    shim it takes them (output width heads x v_channels) and the original comes back after."""
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.moe import moe_utils

    from megatron_dsv3.compat.megatron_local_spec import NAME, local_spec_shims

    before = (DotProductAttention.__init__, mla.HAVE_TE, vars(moe_utils).get("te_general_gemm", "unset"))
    config = MLATransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, qk_head_dim=16,
                                  qk_pos_emb_head_dim=8, v_head_dim=12, kv_lora_rank=16, rope_type="rope")
    with cpu_shims(), local_spec_shims():
        assert NAME in compat.applied() or "k_channels" in str(before[0].__code__.co_varnames)
        attention = DotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                        attention_type="self", softmax_scale=0.125, k_channels=24, v_channels=12,
                                        pg_collection=types.SimpleNamespace(tp=types.SimpleNamespace(
                                            size=lambda: 1, rank=lambda: 0)))  # a one-rank TP group
        assert attention.hidden_size_per_partition == 4 * 12 and attention.softmax_scale == 0.125
        assert moe_utils.te_general_gemm is None or callable(moe_utils.te_general_gemm)
    assert (DotProductAttention.__init__, mla.HAVE_TE, vars(moe_utils).get("te_general_gemm", "unset")) == before


def test_fp8_partial_blocks_shim_dequantises_padded_edges_and_is_undone():
    from megatron_dsv3.compat.transformers_fp8 import NAME, fp8_partial_blocks
    from megatron_dsv3.fp8 import dequantize_blocks, quantize_blocks

    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    original = fp8.Fp8Dequantize._dequantize_one
    q, scale = quantize_blocks(torch.randn(200, 130))  # grid 2 x 2, both edges partial
    with fp8_partial_blocks():
        assert NAME in compat.applied()
        out = fp8.Fp8Dequantize._dequantize_one(object.__new__(fp8.Fp8Dequantize), q, scale,
                                                output_dtype=torch.float32)
    assert fp8.Fp8Dequantize._dequantize_one is original
    assert torch.equal(out, dequantize_blocks(q, scale))
