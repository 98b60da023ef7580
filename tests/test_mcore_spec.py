"""DeepSeek-V3 through Megatron-Core's own GPTModel (megatron_dsv3.mcore), on one CPU process.

A single-rank gloo world, Megatron's parallel state at TP=PP=EP=1 and `megatron_dsv3.compat.megatron_cpu`'s
shims stand in for the GPU cluster. The central check: with DSV3Model's weights renamed into a
GPTModel built from our specs, both models give the same logits. Measured max |diff| on torch 2.13
CPU, fp32: 0.0 (bit-identical) for the tiny preset, with and without YaRN / q_lora_rank=0; the
test allows 1e-5.
"""
import contextlib
import importlib.util

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_moe_layer_wise_logging_tracker,
    save_to_aux_losses_tracker,
)
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.core.transformer.spec_utils import ModuleSpec, import_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

import megatron_dsv3
from megatron_dsv3 import ConfigError, DSV3Config, YarnConfig, build_model
from megatron_dsv3.convert import mcore_names
from megatron_dsv3.mcore import config as mcore_config
from megatron_dsv3.mcore import layers, specs
from megatron_dsv3.model.moe.router import update_expert_bias
from megatron_dsv3.compat import megatron_cpu
from megatron_dsv3.compat.megatron_api import mtp_layer_attribute

pytestmark = pytest.mark.filterwarnings("ignore:full scope is deprecated")


@pytest.fixture(scope="module", autouse=True)
def megatron_world():
    """One gloo rank, Megatron's groups at size 1, CPU shims active for the whole module."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    megatron_cpu.apply()
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    megatron_cpu.undo()
    if created:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _clean_megatron_globals():
    yield
    MTPLossLoggingHelper.tracker.clear()
    _clear_aux_loss_tracker()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def _clear_aux_loss_tracker() -> None:
    """Drop every layer-wise aux-loss entry: the dict itself up to megatron-core 0.17, the metrics
    tracker from 0.18 (get_moe_layer_wise_logging_tracker() then returns a copy)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        get_moe_layer_wise_logging_tracker().clear()
    else:
        get_moe_metrics_tracker().metrics.clear()


def tiny(**overrides) -> DSV3Config:
    return DSV3Config.preset("tiny", **overrides)


def gpt(cfg: DSV3Config, spec=None, **megatron_overrides):
    """GPTModel with our decoder (and MTP) specs for `cfg`; returns (model, megatron config)."""
    config = mcore_config.megatron_config_from_dsv3(cfg, use_cpu_initialization=True, **megatron_overrides)
    model = GPTModel(config, transformer_layer_spec=specs.get_dsv3_decoder_block_spec(config) if spec is None else spec,
                     mtp_block_spec=specs.get_dsv3_mtp_block_spec(config), vocab_size=cfg.vocab_size,
                     max_sequence_length=cfg.max_position_embeddings, position_embedding_type="rope")
    return model, config


def paired(cfg: DSV3Config, **megatron_overrides):
    """(DSV3Model, GPTModel holding the same weights, megatron config)."""
    ours = build_model(cfg)
    model, config = gpt(cfg, **megatron_overrides)
    model.load_state_dict(mcore_names.dsv3_state_dict_to_megatron(ours.state_dict()), strict=True)
    return ours, model, config


def batch(cfg: DSV3Config, b=2, s=16, seed=0):
    """tokens [b, s], labels = tokens shifted by one, Megatron's position_ids [b, s]."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
    return seq[:, :-1], seq[:, 1:], torch.arange(s).expand(b, -1)


# ------------------------------------------------------------------------ forward
def test_gpt_model_with_dsv3_block_spec_returns_logits_and_follows_first_k_dense():
    cfg = tiny(mtp_num_modules=0)
    model, config = gpt(cfg)
    assert config.moe_layer_freq == [0, 1, 1]
    kinds = [type(layer.mlp).__name__ for layer in model.decoder.layers]
    assert kinds == ["MegatronSwiGLU", "MegatronDeepSeekMoE", "MegatronDeepSeekMoE"]
    assert all(type(layer.self_attention).__name__ == "MegatronMLA" for layer in model.decoder.layers)
    tokens, _, positions = batch(cfg)
    logits = model(tokens, positions, None)
    assert logits.shape == (2, 16, cfg.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(q_lora_rank=0, yarn=YarnConfig(factor=4.0, original_max_position_embeddings=8, mscale=0.8, mscale_all_dim=0.8)),
], ids=["tiny", "no-q-lora+yarn"])
def test_gpt_model_gives_dsv3_model_logits_with_the_same_weights(overrides):
    cfg = tiny(mtp_num_modules=0, **overrides)
    ours, model, _ = paired(cfg)
    tokens, _, positions = batch(cfg)
    for train in (False, True):  # train: dropout is 0, routing also counts tokens
        ours.train(train)
        model.train(train)
        with torch.no_grad():
            diff = (model(tokens, positions, None) - ours(tokens)).abs().max().item()
        assert diff <= 1e-5, diff  # measured: 0.0
    # ... and the weights come back under DSV3Model's names.
    back = mcore_names.megatron_state_dict_to_dsv3(model.state_dict())
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_state_dict_renames_are_inverse_and_cover_mtp():
    ours = build_model(tiny(mtp_num_modules=1))
    state = ours.state_dict()
    megatron = mcore_names.dsv3_state_dict_to_megatron(state)
    assert f"mtp.layers.0.{mtp_layer_attribute()}.mlp.router.expert_bias" in megatron
    assert megatron["mtp.layers.0.final_layernorm.weight"] is state["mtp.0.norm.weight"]
    assert megatron["decoder.layers.1.pre_mlp_layernorm.weight"] is state["layers.1.post_attention_layernorm.weight"]
    assert mcore_names.megatron_state_dict_to_dsv3(megatron).keys() == state.keys()
    with pytest.raises(KeyError, match="rotary.bogus"):
        mcore_names.dsv3_state_dict_to_megatron({"rotary.bogus": torch.zeros(1)})


def test_mtp_block_spec_builds_megatron_mtp_equal_to_our_mtp():
    """Megatron's MTP layer with our layer spec == DSV3Model's MTP with the same weights. Both feed
    depth 1 the final-normed main hidden state; the final norm weights are randomised so that a
    pre-/post-norm mismatch would show."""
    cfg = tiny(mtp_num_modules=1)
    ours = build_model(cfg)
    with torch.no_grad():
        ours.norm.weight.uniform_(0.5, 1.5)
    model, config = gpt(cfg)
    model.load_state_dict(mcore_names.dsv3_state_dict_to_megatron(ours.state_dict()), strict=True)
    spec = specs.get_dsv3_mtp_block_spec(config)
    assert len(spec.layer_specs) == 1
    assert type(getattr(model.mtp.layers[0], mtp_layer_attribute()).mlp).__name__ == "MegatronDeepSeekMoE"
    assert type(model.mtp.layers[0].enorm) is layers.MegatronRMSNorm
    tokens, labels, positions = batch(cfg)
    model.train()
    ours.train()
    MTPLossLoggingHelper.tracker.clear()
    # A tracker entry left by a model without MTP (3 layers) must not break logging layer 4.
    save_to_aux_losses_tracker(layers.BALANCE_LOSS_NAME, torch.zeros(()), 1, cfg.num_layers)
    with torch.no_grad():
        lm_per_token = model(tokens, positions, None, labels=labels)  # [b, s]; MTP loss is tracked
        tracked = MTPLossLoggingHelper.tracker  # "values" up to megatron-core 0.18, "loss_values" from 0.19
        megatron_mtp = tracked["values" if "values" in tracked else "loss_values"][0].item()
        out = ours(tokens, labels=labels)
    assert abs(lm_per_token.mean().item() - out.lm_loss.item()) <= 1e-5  # measured: 4.8e-7 (reduction order)
    assert abs(megatron_mtp - out.mtp_losses[0].item()) <= 1e-5


def test_no_mtp_block_without_mtp_layers():
    config = mcore_config.megatron_config_from_dsv3(tiny(mtp_num_modules=0))
    assert config.mtp_num_layers is None and specs.get_dsv3_mtp_block_spec(config) is None


# ----------------------------------------------------------------------- backward
def test_backward_reaches_every_parameter_and_expert_bias_is_a_buffer():
    cfg = tiny(mtp_num_modules=1)
    model, _ = gpt(cfg)
    tokens, labels, positions = batch(cfg)
    model.train()
    model(tokens, positions, None, labels=labels).mean().backward()
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    routers = [name for name in params if name.endswith("mlp.router.weight")]
    assert len(routers) == 3  # two decoder MoE layers + the MTP layer
    assert all(params[name].grad.abs().sum() > 0 for name in routers)
    buffers = dict(model.named_buffers())
    assert "decoder.layers.1.mlp.router.expert_bias" in buffers
    assert not any(name.endswith("expert_bias") for name in params)
    assert "decoder.layers.1.mlp.router.expert_bias" in model.state_dict()


@pytest.mark.parametrize("per_token", [False, True])
def test_balance_loss_gradient_takes_megatrons_aux_loss_scale(per_token):
    """The sequence-wise balance loss reaches the router through MoEAuxLossAutoScaler (scaled as
    Megatron's schedules scale the main loss) with the gradient DSV3Model gives it, and is logged
    in Megatron's aux-loss tracker."""
    cfg = tiny(mtp_num_modules=0, seq_aux_loss_coeff=0.5)
    ours, model, _ = paired(cfg, calculate_per_token_loss=per_token)
    tokens, _, positions = batch(cfg)

    def router_grads(net, run):
        for name, p in net.named_parameters():
            p.requires_grad_(name.endswith("router.weight"))
            p.grad = None
        net.train()
        (run() * 0).sum().backward()  # the main loss contributes exactly zero
        return [p.grad.clone() for name, p in net.named_parameters() if name.endswith("router.weight")]

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.25))
    megatron_grads = router_grads(model, lambda: model(tokens, positions, None))
    scale = 0.25 * (tokens.numel() if per_token else 1)
    our_grads = router_grads(ours, lambda: ours(tokens, balance_loss_scale=scale))
    assert len(megatron_grads) == 2 and all(g.abs().sum() > 0 for g in megatron_grads)
    for mine, theirs in zip(our_grads, megatron_grads):
        torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-8)
    logged = get_moe_layer_wise_logging_tracker()[layers.BALANCE_LOSS_NAME]["values"]
    expected = torch.stack([m.last_balance_loss for m in ours.moe_layers()]) / cfg.seq_aux_loss_coeff
    torch.testing.assert_close(logged[1:3], expected)


def test_megatron_expert_bias_update_matches_ours():
    """finalize_model_grads' bias step (what Megatron-LM runs each step with
    moe_router_enable_expert_bias) moves our routers' expert_bias as update_expert_bias does."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias, reset_model_temporary_tensors

    cfg = tiny(mtp_num_modules=0)
    ours, model, config = paired(cfg)
    assert config.moe_router_enable_expert_bias and config.moe_router_bias_update_rate == cfg.bias_update_rate
    tokens, _, positions = batch(cfg)
    ours.train()
    model.train()
    model(tokens, positions, None)  # a training forward (gradients recorded): Megatron's routers count only then
    with torch.no_grad():
        ours(tokens)
    _update_router_expert_bias([model], config)
    reset_model_temporary_tensors(config, [model])
    update_expert_bias(ours.routers(), cfg.bias_update_rate)
    theirs = [m.router for m in model.modules() if isinstance(m, layers.MegatronDeepSeekMoE)]
    for mine, their in zip(ours.routers(), theirs):
        assert their.expert_bias.abs().sum() > 0
        assert torch.equal(their.expert_bias, mine.expert_bias)
        assert their.tokens_per_expert.sum() == 0


# ------------------------------------------------------------------------ configs
@pytest.mark.parametrize("cfg", [
    DSV3Config.preset("tiny"),
    DSV3Config.preset("deepseek-v3-lite"),
    DSV3Config.preset("deepseek-v3-671b"),
    DSV3Config.preset("tiny", q_lora_rank=0, seq_aux_loss_coeff=0.0, bias_update_rate=0.0, mtp_num_modules=2,
                      yarn=YarnConfig(factor=40.0, original_max_position_embeddings=4096, mscale=1.0,
                                      mscale_all_dim=1.0)),
], ids=["tiny", "lite", "671b", "yarn-no-aux"])
def test_config_round_trip_preserves_every_field(cfg):
    config = mcore_config.megatron_config_from_dsv3(cfg)
    back = mcore_config.dsv3_config_from_megatron(config, vocab_size=cfg.vocab_size,
                                           max_position_embeddings=cfg.max_position_embeddings)
    assert back == cfg
    k = cfg.first_k_dense_layers
    assert config.moe_layer_freq == [0] * k + [1] * (cfg.num_layers - k)
    assert config.q_lora_rank == (cfg.q_lora_rank or None)
    assert config.moe_router_score_function == "sigmoid" and config.qk_layernorm
    assert config.moe_router_topk_scaling_factor == cfg.routed_scaling_factor
    grouped = cfg.num_expert_groups > 1
    assert config.moe_router_num_groups == (cfg.num_expert_groups if grouped else None)
    assert config.moe_router_group_topk == (cfg.num_limited_groups if grouped else None)
    assert config.moe_router_enable_expert_bias == (cfg.bias_update_rate > 0)
    assert config.rope_type == ("yarn" if cfg.yarn else "rope")
    assert config.hidden_dropout == 0.0 and config.attention_dropout == 0.0


def test_first_k_dense_is_read_from_moe_layer_freq():
    config = mcore_config.megatron_config_from_dsv3(tiny())
    config.moe_layer_freq = 1  # Megatron's int form: every layer MoE
    assert mcore_config.dsv3_config_from_megatron(config).first_k_dense_layers == 0
    config.moe_layer_freq = [0, 0, 1]
    assert mcore_config.dsv3_config_from_megatron(config).first_k_dense_layers == 2
    config.moe_layer_freq = [1, 0, 1]
    with pytest.raises(ConfigError, match="moe_layer_freq"):
        mcore_config.dsv3_config_from_megatron(config)
    config.moe_layer_freq = [0, 1]
    with pytest.raises(ConfigError, match="moe_layer_freq"):
        mcore_config.dsv3_config_from_megatron(config)


@pytest.mark.parametrize("field,value", [
    ("moe_router_score_function", "softmax"),
    ("moe_router_load_balancing_type", "aux_loss"),
    ("qk_layernorm", False),
    ("add_bias_linear", True),
    ("gated_linear_unit", False),
    ("multi_latent_attention", False),
    ("fp8_recipe", "delayed"),
])
def test_other_architectures_are_refused_naming_the_field(field, value):
    config = mcore_config.megatron_config_from_dsv3(tiny())
    setattr(config, field, value)
    if field == "fp8_recipe":
        config.fp8 = "e4m3"
    with pytest.raises(ConfigError, match=field):
        mcore_config.dsv3_config_from_megatron(config)


def test_router_pre_softmax_is_accepted_as_a_no_op_for_sigmoid_routing():
    """Megatron reads moe_router_pre_softmax only for softmax scores; its own DeepSeek-V3 example sets it."""
    config = mcore_config.megatron_config_from_dsv3(tiny())
    config.moe_router_pre_softmax = True
    assert mcore_config.dsv3_config_from_megatron(config) == mcore_config.dsv3_config_from_megatron(
        mcore_config.megatron_config_from_dsv3(tiny()))


def test_group_score_difference_from_megatrons_router_is_said():
    """Megatron sums the top topk // group_topk expert scores per group, DeepSeek-V3 the top 2."""
    assert mcore_config.group_score_difference(8, 4, 8) is None  # DeepSeek-V3 671B: 8 // 4 = 2
    assert mcore_config.group_score_difference(2, 1, 1) is None  # no groups
    with pytest.warns(mcore_config.GroupScoreWarning, match=r"moe_router_topk=6 // moe_router_group_topk=2 = 3.*top 2"):
        config = mcore_config.megatron_config_from_dsv3(tiny(num_routed_experts=16, num_experts_per_token=6))
    with pytest.warns(mcore_config.GroupScoreWarning, match="top 3 expert scores"):
        mcore_config.dsv3_config_from_megatron(config)


@pytest.mark.parametrize("changes,field", [
    (dict(sequence_parallel=True), "sequence_parallel"),
    (dict(context_parallel_size=2), "context_parallel_size"),
    (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(fp8="e4m3", fp8_recipe="blockwise"), "fp8"),
    (dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=2), "expert_tensor_parallel_size"),
    (dict(moe_expert_capacity_factor=1.0), "moe_expert_capacity_factor"),
    (dict(moe_shared_expert_gate=True), "moe_shared_expert_gate"),
    (dict(moe_z_loss_coeff=1e-3), "moe_z_loss_coeff"),
])
def test_unsupported_megatron_features_raise_naming_them(changes, field):
    config = mcore_config.megatron_config_from_dsv3(tiny(), use_cpu_initialization=True)
    for name, value in changes.items():  # set after construction: Megatron's own checks need a real cluster
        setattr(config, name, value)
    with pytest.raises(ConfigError, match=field):
        specs.get_dsv3_decoder_block_spec(config)
    with pytest.raises(ConfigError, match=field):  # the --spec path builds no block spec: the adapters check
        GPTModel(config, transformer_layer_spec=specs.dsv3_layer_spec, vocab_size=320, max_sequence_length=64,
                 position_embedding_type="rope")


def test_fp8_tile_reads_from_megatron_blockwise_and_is_never_emitted_for_the_adapters():
    config = mcore_config.megatron_config_from_dsv3(tiny())
    config.fp8, config.fp8_recipe = "e4m3", "blockwise"
    assert mcore_config.dsv3_config_from_megatron(config).fp8 == "tile"
    # The adapters refuse FP8 configs, so the config builder emits none: it refuses with the same reason.
    with pytest.raises(ConfigError, match=r"fp8='tile' through these adapters is not supported"):
        mcore_config.megatron_config_from_dsv3(tiny(fp8="tile"))


# ------------------------------------------------------------ registry and --spec
def test_registry_names_the_megatron_spec_builders_and_refuses_a_second_registration():
    assert megatron_dsv3.get("layer_spec", "megatron-gpt") is specs.get_dsv3_decoder_block_spec
    assert megatron_dsv3.get("layer_spec", "megatron-gpt-mtp") is specs.get_dsv3_mtp_block_spec
    with pytest.raises(KeyError, match="already registered"):
        megatron_dsv3.register("layer_spec", "megatron-gpt", specs.get_dsv3_decoder_block_spec)
    megatron_dsv3.register("layer_spec", "megatron-gpt", specs.get_dsv3_decoder_block_spec, overwrite=True)
    assert megatron_dsv3.get("layer_spec", "megatron-gpt") is specs.get_dsv3_decoder_block_spec


def test_spec_argument_of_megatron_lm_pretrain_gpt():
    """Megatron-LM's gpt_builders.py: `--spec MODULE NAME` -> import_module((MODULE, NAME)), passed
    unchanged as GPTModel(transformer_layer_spec=...). TransformerBlock accepts a layer ModuleSpec
    (repeated num_layers times) or TransformerBlockSubmodules; `dsv3_layer_spec` is the former and
    still builds dense layers for the first k."""
    spec = import_module(["megatron_dsv3.mcore.specs", "dsv3_layer_spec"])
    assert isinstance(spec, ModuleSpec) and spec is specs.dsv3_layer_spec
    cfg = tiny(mtp_num_modules=0)
    ours, reference, _ = paired(cfg)
    model, _ = gpt(cfg, spec=spec)
    kinds = [type(layer.mlp).__name__ for layer in model.decoder.layers]
    assert kinds == ["MegatronSwiGLU", "MegatronDeepSeekMoE", "MegatronDeepSeekMoE"]
    if importlib.util.find_spec("transformer_engine") is None:  # Megatron's own final norm
        assert type(model.decoder.final_layernorm) is torch.nn.RMSNorm
    assert model.state_dict().keys() == reference.state_dict().keys()
    model.load_state_dict(reference.state_dict())
    tokens, _, positions = batch(cfg)
    with torch.no_grad():
        assert (model(tokens, positions, None) - ours(tokens)).abs().max() <= 1e-5


def test_spec_module_builds_its_mtp_block_for_the_patched_gpt_builders():
    """patches/megatron-lm-*-gpt_builders-spec-mtp.patch: with `--spec MODULE NAME --mtp-num-layers N`
    the builder takes `MODULE.mtp_block_spec(config, vp_stage=...)` (unpatched, 0.16-0.19 raise
    UnboundLocalError: use_te); GPTModel then holds our MTP layer."""
    import importlib

    builder = getattr(importlib.import_module("megatron_dsv3.mcore.specs"), "mtp_block_spec")
    cfg = tiny(mtp_num_modules=1)
    config = mcore_config.megatron_config_from_dsv3(cfg, use_cpu_initialization=True)
    model = GPTModel(config, transformer_layer_spec=import_module(["megatron_dsv3.mcore.specs", "dsv3_layer_spec"]),
                     mtp_block_spec=builder(config, vp_stage=None), vocab_size=cfg.vocab_size,
                     max_sequence_length=64, position_embedding_type="rope")
    assert type(getattr(model.mtp.layers[0], mtp_layer_attribute()).mlp).__name__ == "MegatronDeepSeekMoE"


@pytest.mark.parametrize("call", ["megatron-lm-0.19", "fork"])
def test_callable_spec_takes_megatron_lm_0_19s_and_the_forks_conventions(call):
    """Megatron-LM 0.19's models/gpt.py calls a callable `--spec` as spec(config, vp_stage=...), config
    being its GPTModelConfig (which holds the TransformerConfig as `.transformer`) and only when
    `vp_stage` is among the parameters; forks (slime and others) as spec(args, config, vp_stage).
    `dsv3_block_spec` (also named `megatron_lm_spec`) takes both and returns the stage's block."""
    import inspect
    from types import SimpleNamespace

    builder = import_module(["megatron_dsv3.mcore.specs", "dsv3_block_spec"])
    assert builder is import_module(["megatron_dsv3.mcore.specs", "megatron_lm_spec"])
    assert not isinstance(builder, ModuleSpec) and "vp_stage" in inspect.signature(builder).parameters
    config = mcore_config.megatron_config_from_dsv3(tiny(mtp_num_modules=0), use_cpu_initialization=True)
    block = builder(SimpleNamespace(transformer=config), vp_stage=None) if call == "megatron-lm-0.19" else \
        builder(None, config, None)
    assert isinstance(block, TransformerBlockSubmodules) and len(block.layer_specs) == 3
    model = GPTModel(config, transformer_layer_spec=block, vocab_size=320, max_sequence_length=64,
                     position_embedding_type="rope")
    assert [type(layer.mlp).__name__ for layer in model.decoder.layers][:2] == ["MegatronSwiGLU", "MegatronDeepSeekMoE"]


def test_spec_objects_build_their_mtp_block_for_the_patched_0_19_builder():
    """patches/megatron-lm-0.19-models_gpt-spec-mtp.patch asks the `--spec` object itself for
    `mtp_block_spec(config, vp_stage=...)` (0.19 passes its GPTModelConfig)."""
    from types import SimpleNamespace

    config = mcore_config.megatron_config_from_dsv3(tiny(mtp_num_modules=1), use_cpu_initialization=True)
    for spec in (specs.dsv3_layer_spec, specs.dsv3_block_spec):
        block = spec.mtp_block_spec(SimpleNamespace(transformer=config), vp_stage=None)
        model = GPTModel(config, transformer_layer_spec=specs.get_dsv3_decoder_block_spec(config), mtp_block_spec=block,
                         vocab_size=320, max_sequence_length=64, position_embedding_type="rope")
        specs.check_mtp_layers(model)
        assert type(getattr(model.mtp.layers[0], mtp_layer_attribute()).mlp) is layers.MegatronDeepSeekMoE


def test_megatrons_own_mtp_beside_our_decoder_is_refused_by_name():
    """A builder that takes our decoder spec and Megatron's stock MTP spec (Megatron-LM 0.19's
    pretrain_gpt.py `--spec` unpatched) would train Megatron's MTP layer: `check_mtp_layers` refuses
    it, and so does the model's first forward. A model all of Megatron's own is left alone."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    from megatron_dsv3.compat.megatron_local_spec import local_spec_shims

    cfg = tiny(mtp_num_modules=1)
    config = mcore_config.megatron_config_from_dsv3(cfg, use_cpu_initialization=True)
    native = native_gpt(cfg)
    with local_spec_shims():
        stock = get_gpt_mtp_block_spec(config, native.decoder.submodules.layer_specs[-1], use_transformer_engine=False)
        mixed = GPTModel(config, transformer_layer_spec=specs.get_dsv3_decoder_block_spec(config), mtp_block_spec=stock,
                         vocab_size=cfg.vocab_size, max_sequence_length=64, position_embedding_type="rope")
    with pytest.raises(ConfigError, match=r"MTP layer 0 was built from Megatron's own specs, not megatron_dsv3's "
                                          r"\(self_attention=megatron\.core\.transformer\.multi_latent_attention\."
                                          r"MLASelfAttention, mlp=megatron\.core\.transformer\.moe\.moe_layer\.MoELayer"):
        specs.check_mtp_layers(mixed)
    tokens, labels, positions = batch(cfg)
    with torch.no_grad(), local_spec_shims():
        native(tokens, positions, None, labels=labels)  # Megatron's own model: no refusal
        with pytest.raises(ConfigError, match="MTP layer 0 was built from Megatron's own specs"):
            mixed(tokens, positions, None, labels=labels)
        ours, _ = gpt(cfg)
        ours(tokens, positions, None, labels=labels)  # ours passes (and the check stops)
    assert not layers._mtp_guard.active


def test_no_unknown_mlp_type_warning_per_layer(caplog):
    """megatron-core 0.16-0.17 log "Unknown MLP type" for each layer whose mlp ModuleSpec names a
    class they do not know; our specs name the class itself."""
    import logging

    with caplog.at_level(logging.WARNING):
        gpt(tiny(mtp_num_modules=1))
        GPTModel(mcore_config.megatron_config_from_dsv3(tiny(mtp_num_modules=0), use_cpu_initialization=True),
                 transformer_layer_spec=specs.dsv3_layer_spec, vocab_size=320, max_sequence_length=64,
                 position_embedding_type="rope")
    assert "Unknown MLP type" not in caplog.text


def test_full_recompute_counts_tokens_and_logs_the_balance_loss_once():
    """Megatron's full recompute runs each layer's forward without gradients, then again with them in
    backward. Like Megatron's own router, ours counts tokens (for the bias update) and makes and logs
    the balance loss only in the forward that records gradients: once per micro-batch, as without
    recompute, with the same gradients."""
    cfg = tiny(mtp_num_modules=0, seq_aux_loss_coeff=0.5)
    tokens, _, positions = batch(cfg)
    runs = []
    for recompute in ({}, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)):
        torch.manual_seed(3)
        model, _ = gpt(cfg, **recompute)
        model.train()
        _clear_aux_loss_tracker()
        model(tokens, positions, None).float().pow(2).mean().backward()
        logged = get_moe_layer_wise_logging_tracker()[layers.BALANCE_LOSS_NAME]["values"].clone()
        counts = torch.stack([m.router.tokens_per_expert for m in model.modules()
                              if isinstance(m, layers.MegatronDeepSeekMoE)])
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((logged, counts, grads))
    (logged, counts, grads), (logged_r, counts_r, grads_r) = runs
    assert logged[1:3].abs().min() > 0 and torch.equal(logged, logged_r)
    assert torch.equal(counts, counts_r) and counts.sum(dim=1).tolist() == [tokens.numel() * cfg.num_experts_per_token] * 2
    assert grads.keys() == grads_r.keys()
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-5, atol=1e-7)


def test_sharded_state_dict_covers_every_tensor_with_tp_axes():
    model, _ = gpt(tiny(mtp_num_modules=0))
    sharded = model.sharded_state_dict()
    plain = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert plain <= set(sharded)
    q_b = sharded["decoder.layers.0.self_attention.q_b_proj.weight"]
    o = sharded["decoder.layers.0.self_attention.o_proj.weight"]
    assert q_b.key.endswith("q_b_proj.weight") and q_b.global_shape == q_b.local_shape  # TP=1
    assert [a for a, n in enumerate(o.axis_fragmentations) if n > 1] == []


def test_sharded_state_dict_refuses_expert_parallel_moe(monkeypatch):
    model, _ = gpt(tiny(mtp_num_modules=0))
    monkeypatch.setattr(layers.parallel_state, "get_expert_model_parallel_world_size", lambda: 2)
    with pytest.raises(NotImplementedError, match="expert-parallel"):
        model.sharded_state_dict()


def test_packed_sequences_and_inference_contexts_raise_at_forward():
    model, _ = gpt(tiny(mtp_num_modules=0))
    attention = model.decoder.layers[0].self_attention
    hidden = torch.randn(16, 2, 128)
    assert attention(hidden)[0].shape == hidden.shape
    with pytest.raises(NotImplementedError, match="packed"):
        attention(hidden, packed_seq_params=object())
    with pytest.raises(NotImplementedError, match="inference"):
        attention(hidden, inference_context=object())


# ------------------------------------------------------- native Megatron-Core checkpoints
def native_gpt(cfg: DSV3Config):
    """GPTModel from Megatron-Core's own MLA + MoE layer specs (local backend), routing spiced."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_dsv3.compat.megatron_local_spec import local_spec_shims

    model_parallel_cuda_manual_seed(1)
    with pytest.warns(mcore_config.GroupScoreWarning) if mcore_config.group_score_difference(
            cfg.num_experts_per_token, cfg.num_limited_groups, cfg.num_expert_groups) else contextlib.nullcontext():
        config = mcore_config.megatron_config_from_dsv3(cfg, use_cpu_initialization=True, rope_type="rope")
    with local_spec_shims():
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        mtp = get_gpt_mtp_block_spec(config, block.layer_specs[-1], use_transformer_engine=False)
        model = GPTModel(config, transformer_layer_spec=block, mtp_block_spec=mtp, vocab_size=cfg.vocab_size,
                         max_sequence_length=cfg.max_position_embeddings, position_embedding_type="rope")
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for name, tensor in model.state_dict().items():
            if name.endswith("router.weight"):
                tensor.normal_(0, 0.15, generator=g)
            elif name.endswith("expert_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.2 - 0.6)
    return model.eval()


def native_logits(model, tokens):
    from megatron_dsv3.compat.megatron_local_spec import local_spec_shims

    with torch.no_grad(), local_spec_shims():
        return model(tokens, torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1), None)


def our_model_from(path, cfg: DSV3Config):
    from megatron_dsv3.convert import DistReader

    reader = DistReader(path)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            tensor.copy_(reader.read(f"model.{key}"))
    return model


def native_and_converted(tmp_path, cfg: DSV3Config):
    """A native GPTModel, and our model from its distributed checkpoint through mcore-to-dist."""
    from megatron.core import dist_checkpointing

    from megatron_dsv3.convert.mcore import mcore_to_dist

    native = native_gpt(cfg)
    (tmp_path / "native").mkdir()
    dist_checkpointing.save(native.sharded_state_dict(), str(tmp_path / "native"))
    mcore_to_dist(tmp_path / "native", tmp_path / "ours", cfg)
    return native, our_model_from(tmp_path / "ours", cfg)


def test_native_megatron_checkpoint_converts_to_ours_and_back(tmp_path):
    """Megatron-Core's own MLA + MoE GPTModel (local spec; 4 experts per token in 2 of 4 groups, so
    Megatron's group score, the top 4 // 2 = 2, is DeepSeek's) -> its distributed checkpoint ->
    mcore-to-dist -> our model: same logits; -> dist-to-mcore -> a fresh native GPTModel: same logits."""
    from megatron.core import dist_checkpointing

    from megatron_dsv3.convert.mcore import dist_to_mcore
    from megatron_dsv3.compat.megatron_local_spec import local_spec_shims

    cfg = tiny(num_experts_per_token=4, seq_aux_loss_coeff=0.0, mtp_num_modules=0)
    native, ours = native_and_converted(tmp_path, cfg)
    tokens = batch(cfg)[0]
    expected = native_logits(native, tokens)
    diff = (ours(tokens) - expected).abs().max().item()
    assert diff <= 1e-5 and expected.std() > 0.1, diff  # measured: 3e-7

    dist_to_mcore(tmp_path / "ours", tmp_path / "back")
    fresh = native_gpt(cfg)
    with local_spec_shims():
        state = {k: v for k, v in fresh.sharded_state_dict().items() if not k.endswith("_extra_state")}
        fresh.load_state_dict(dist_checkpointing.load(state, str(tmp_path / "back")), strict=False)
    assert torch.equal(native_logits(fresh, tokens), expected)


def test_native_mtp_layer_converts_to_our_mtp_module(tmp_path):
    """Megatron's MTP layer (`transformer_layer` up to 0.16, `mtp_model_layer` from 0.17): the same
    per-token LM loss (GPTModel with MTP returns losses, not logits) and MTP weights in our names."""
    from megatron_dsv3.compat.megatron_local_spec import local_spec_shims

    cfg = tiny(num_experts_per_token=4, seq_aux_loss_coeff=0.0, mtp_num_modules=1)
    native, ours = native_and_converted(tmp_path, cfg)
    state = native.state_dict()
    layer = f"mtp.layers.0.{mtp_layer_attribute()}"
    assert torch.equal(ours.mtp[0].layer.self_attn.kv_b_proj.weight, state[f"{layer}.self_attention.linear_kv_up_proj.weight"])
    assert torch.equal(ours.mtp[0].layer.mlp.experts.gate_up_weight[3],
                       state[f"{layer}.mlp.experts.local_experts.3.linear_fc1.weight"])
    assert torch.equal(ours.mtp[0].eh_proj.weight, state["mtp.layers.0.eh_proj.weight"])
    assert torch.equal(ours.mtp[0].norm.weight, state["mtp.layers.0.final_layernorm.weight"])
    tokens, labels, positions = batch(cfg)
    with torch.no_grad(), local_spec_shims():
        native_loss = native(tokens, positions, None, labels=labels)  # [b, s]
    our_loss = torch.nn.functional.cross_entropy(ours(tokens).flatten(0, 1), labels.flatten(), reduction="none")
    assert (our_loss.view_as(native_loss) - native_loss).abs().max() <= 1e-5


def test_transformer_engine_names_map_to_ours():
    """The TE spec's names: fused norms (layer_norm_weight), grouped experts (weight{i}), _extra_state."""
    from megatron_dsv3.convert.mcore_names import NativeNameError, native_checkpoint_names, native_pieces

    cases = {
        "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight": "layers.0.self_attn.q_a_layernorm.weight",
        "decoder.layers.0.self_attention.linear_kv_up_proj.layer_norm_weight":
            "layers.0.self_attn.kv_a_layernorm.weight",
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": "layers.0.post_attention_layernorm.weight",
        "decoder.layers.1.pre_mlp_layernorm.weight": "layers.1.post_attention_layernorm.weight",
        "decoder.layers.1.mlp.experts.linear_fc1.weight5": "layers.1.mlp.experts.gate_up_weight",
        "decoder.layers.1.mlp.experts.linear_fc2.weight7": "layers.1.mlp.experts.down_weight",
        "mtp.layers.0.mtp_model_layer.self_attention.linear_kv_up_proj.layer_norm_weight":
            "mtp.0.layer.self_attn.kv_a_layernorm.weight",
    }
    for name, key in cases.items():
        (piece,) = native_pieces(name, (128, 64))
        assert piece.key == key, name
    (piece,) = native_pieces("decoder.layers.1.mlp.experts.linear_fc1.weight5", (128, 128))
    assert piece.expert and piece.offsets == (5, 0, 0)
    gate, up = native_pieces("decoder.layers.0.mlp.linear_fc1.weight", (640, 128))  # [gate; up] stacked
    assert (gate.key, gate.row_start, gate.row_stop) == ("layers.0.mlp.gate_proj.weight", 0, 320)
    assert (up.key, up.row_start, up.row_stop) == ("layers.0.mlp.up_proj.weight", 320, 640)
    assert native_pieces("decoder.layers.1.mlp.experts.linear_fc1._extra_state", ()) == []
    with pytest.raises(NativeNameError, match="decoder.layers.1.self_attention.linear_qkv.weight"):
        native_pieces("decoder.layers.1.self_attention.linear_qkv.weight", (1, 1))

    # ours -> TE checkpoint names -> ours covers every tensor once
    cfg = tiny(mtp_num_modules=1)
    ours = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    names = native_checkpoint_names(ours, te=True, mtp_layer="mtp_model_layer", dense_layers={0})
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in names  # MoE layers keep a separate norm under TE
    assert names["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * cfg.dense_ffn_hidden_size, cfg.hidden_size)
    covered = [p.key for name, shape in names.items() for p in native_pieces(name, shape)]
    assert sorted(covered) == sorted(ours)
