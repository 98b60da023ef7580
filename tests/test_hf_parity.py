"""Parity with transformers' DeepseekV3ForCausalLM and the Hugging Face weight mapping.

Same random weights in both models give the same logits (fp32, CPU, eager attention), with
group-limited routing and a negative random routing bias active; weights map both ways.
"""
import warnings

import pytest
import torch

from megatron_dsv3 import DSV3Config, YarnConfig, build_model
from megatron_dsv3.convert.hf import (HFWeightError, MTPCopyMismatchWarning, dequantize_fp8_blockwise, export_hf_weights,
                              load_hf_checkpoint, load_hf_weights, save_hf_checkpoint)
from megatron_dsv3.fp8 import quantize_blocks
from megatron_dsv3.model.moe.router import Router

from transformers import DeepseekV3ForCausalLM
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_modeling

TOL = 1e-4
SEQ = 40  # longer than YaRN's original_max_position_embeddings=16 below

# mscale == mscale_all_dim: transformers then leaves cos/sin unscaled, as DeepSeek's reference does.
YARN = YarnConfig(factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0)
CASES = {
    "q_lora": {},
    "no_q_lora": {"q_lora_rank": 0},
    "yarn": {"yarn": YARN, "max_position_embeddings": 64},
    "yarn_no_q_lora": {"q_lora_rank": 0, "yarn": YARN, "max_position_embeddings": 64},
}


def tiny(**overrides) -> DSV3Config:
    # tiny: 8 experts in 4 groups, 2 groups kept, top-2 -> group-limited routing is active.
    # No balance loss: logits are compared in eval mode.
    return DSV3Config.preset("tiny", seq_aux_loss_coeff=0.0, **overrides)


def mtp_free(state_dict, config):
    """transformers' DeepseekV3ForCausalLM has no MTP: drop layers >= num_layers."""
    prefixes = tuple(f"model.layers.{config.num_layers + k}." for k in range(config.mtp_num_modules))
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


@torch.no_grad()
def spice_routing(model, seed):
    """Router weights large enough for scores to vary by token; a random, mostly negative bias
    (sigmoid + bias < 0 for many experts) so the group mask's fill value matters."""
    g = torch.Generator().manual_seed(seed)
    for router in model.routers():
        router.weight.normal_(0, 0.15, generator=g)
        router.expert_bias.copy_(torch.randn(router.expert_bias.shape, generator=g) * 0.2 - 0.6)
    return model


def hf_model(config: DSV3Config):
    model = DeepseekV3ForCausalLM._from_config(config.to_hf(), attn_implementation="eager", dtype=torch.float32)
    model.config._experts_implementation = "eager"  # the plain per-expert loop as the reference
    return model.eval()


def tokens(config, b=2, s=SEQ, seed=0):
    return torch.randint(0, config.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_both_ways(case):
    config = tiny(**CASES[case])
    ours = spice_routing(build_model(config, seed=1), seed=1).eval()
    ref = hf_model(config)
    ref.load_state_dict(mtp_free(export_hf_weights(ours, fused_experts=True), config), strict=True)
    x = tokens(config)
    with torch.no_grad():
        a, b = ours(x), ref(x).logits
    diff = (a - b).abs().max().item()
    print(f"{case}: ours -> transformers max abs logits diff {diff:.3g}")
    assert diff < TOL
    assert a.std() > 0.1  # not a degenerate comparison

    # transformers' weights (its own init) -> our model.
    torch.manual_seed(7)
    ref2 = hf_model(config)
    with torch.no_grad():
        for layer in ref2.model.layers[config.first_k_dense_layers:]:
            layer.mlp.gate.weight.normal_(0, 0.15)
            layer.mlp.gate.e_score_correction_bias.normal_(-0.6, 0.2)
    fresh = build_model(config, seed=2).eval()
    result = load_hf_weights(fresh, ref2.state_dict(), strict=False)
    assert result.unexpected == [] and all(k.startswith(f"model.layers.{config.num_layers}.") for k in result.missing)
    with torch.no_grad():
        a, b = fresh(x), ref2(x).logits
    diff = (a - b).abs().max().item()
    print(f"{case}: transformers -> ours max abs logits diff {diff:.3g}")
    assert diff < TOL


def test_router_matches_transformers_with_negative_bias_and_groups():
    config = tiny(num_routed_experts=16, num_expert_groups=8, num_limited_groups=2, num_experts_per_token=3)
    ours = Router(config)
    ref = hf_modeling.DeepseekV3TopkRouter(config.to_hf())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ours.weight.normal_(0, 0.3, generator=g)
        ours.expert_bias.copy_(torch.randn(16, generator=g) * 0.3 - 0.8)
        ref.weight.copy_(ours.weight)
        ref.e_score_correction_bias.copy_(ours.expert_bias)
    x = torch.randn(4, 128, config.hidden_size, generator=g)
    routing = ours(x)
    _, ref_gates, ref_ids = ref(x)
    ours_sorted, order = routing.expert_ids.sort(dim=-1)
    ref_sorted, ref_order = ref_ids.sort(dim=-1)
    assert torch.equal(ours_sorted, ref_sorted)
    torch.testing.assert_close(routing.gates.gather(1, order), ref_gates.gather(1, ref_order), rtol=1e-6, atol=1e-6)

    # Why the mask value matters: biased scores are negative here, so masking the dropped groups
    # with 0.0 (older transformers) instead of -inf would pick experts from dropped groups.
    biased = torch.sigmoid(x.flatten(0, 1) @ ours.weight.t()) + ours.expert_bias
    assert (biased < 0).float().mean() > 0.3
    kept = biased.view(-1, 8, 2).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    keep = torch.zeros(biased.shape[0], 8, dtype=torch.bool).scatter_(1, kept, True).repeat_interleave(2, dim=1)
    zero_masked = biased.masked_fill(~keep, 0.0).topk(3, dim=-1).indices
    assert not torch.equal(zero_masked.sort(-1).values, ours_sorted)
    # ... and group limiting changes the choice compared to a plain top-k.
    assert not torch.equal(biased.topk(3, dim=-1).indices.sort(-1).values, ours_sorted)


@pytest.mark.parametrize("fused", [False, True])
def test_export_then_load_is_identity_on_our_state_dict(fused):
    config = tiny(mtp_num_modules=1)
    source = spice_routing(build_model(config, seed=1), seed=3)
    exported = export_hf_weights(source, fused_experts=fused)
    n, e = config.num_layers, config.num_routed_experts
    per_expert = f"model.layers.1.mlp.experts.{e - 1}.up_proj.weight"
    assert (per_expert in exported) != fused
    assert ("model.layers.1.mlp.experts.gate_up_proj" in exported) == fused
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.e_score_correction_bias",
                 "self_attn.kv_b_proj.weight", "input_layernorm.weight"):
        assert f"model.layers.{n}.{name}" in exported, name
    assert not any(k.startswith(f"model.layers.{n + 1}.") for k in exported)
    assert torch.equal(exported[f"model.layers.{n}.shared_head.head.weight"], source.lm_head.weight)
    assert torch.equal(exported[f"model.layers.{n}.eh_proj.weight"], source.mtp[0].eh_proj.weight)

    target = build_model(config, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MTPCopyMismatchWarning)
        result = load_hf_weights(target, exported)
    assert result.missing == [] and result.unexpected == [] and len(result.mtp_copies_checked) == 2
    want, got = source.state_dict(), target.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


# Training-recipe fields that a Hugging Face config does not carry; from_hf takes them as overrides.
TRAINING_ONLY = ("bias_update_rate", "seq_aux_loss_coeff", "mtp_loss_weight", "fp8")


def test_config_round_trips_through_transformers():
    for config in (tiny(), tiny(q_lora_rank=0, mtp_num_modules=2),
                   tiny(yarn=YarnConfig(factor=4.0, original_max_position_embeddings=128, mscale=0.7)),
                   DSV3Config.preset("deepseek-v3-671b", yarn=YarnConfig()), DSV3Config.preset("deepseek-v3-lite")):
        training = {name: getattr(config, name) for name in TRAINING_ONLY}
        assert DSV3Config.from_hf(config.to_hf(), **training) == config
    config = tiny()
    training = {name: getattr(config, name) for name in TRAINING_ONLY}
    assert DSV3Config.from_hf(hf_model(config).config, **training) == config


def test_fp8_blockwise_dequantisation_known_answer():
    q = torch.ones(130, 260).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    w = dequantize_fp8_blockwise(q, scale)
    assert w.dtype == torch.float32 and w.shape == (130, 260)
    assert (w[0, 0], w[127, 127], w[0, 128], w[0, 259], w[128, 0], w[129, 259]) == (1, 1, 2, 3, 4, 6)
    with pytest.raises(HFWeightError, match=r"expected \(2, 3\)"):
        dequantize_fp8_blockwise(q, scale[:, :2])
    # Round trip through the quantiser: E4M3 keeps 3 mantissa bits -> relative error <= 2^-4.
    weight = torch.randn(300, 200)
    q, s = quantize_blocks(weight)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    err = (dequantize_fp8_blockwise(q, s) - weight).abs()
    assert (err <= weight.abs() * 2**-4 + 1e-6).all() and err.max() > 0


def test_fp8_checkpoint_is_dequantised_on_load():
    config = tiny(mtp_num_modules=0)
    source = build_model(config, seed=1)
    exported = export_hf_weights(source)
    fp8 = {}
    for name in ("model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight"):  # 320 x 128: two row blocks, the second partial
        q, s = quantize_blocks(exported[name] * 40)
        exported[name], exported[name + "_scale_inv"] = q, s
        fp8[name] = dequantize_fp8_blockwise(q, s)
    target = build_model(config, seed=2)
    result = load_hf_weights(target, exported)
    assert sorted(result.dequantized) == sorted(fp8)
    assert torch.equal(target.layers["1"].self_attn.q_b_proj.weight, fp8["model.layers.1.self_attn.q_b_proj.weight"])
    down = fp8["model.layers.1.mlp.experts.3.down_proj.weight"]
    assert torch.equal(target.layers["1"].mlp.experts.down_weight[3], down)
    assert torch.equal(target.layers["0"].mlp.gate_proj.weight, fp8["model.layers.0.mlp.gate_proj.weight"])
    assert not torch.equal(fp8["model.layers.0.mlp.gate_proj.weight"], source.layers["0"].mlp.gate_proj.weight * 40)

    bad = dict(exported)
    del bad["model.layers.0.mlp.gate_proj.weight_scale_inv"]
    with pytest.raises(HFWeightError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: float8 weight without"):
        load_hf_weights(target, bad)
    bad = dict(exported, **{"model.layers.0.mlp.gate_proj.weight_scale_inv": torch.ones(2, 2)})
    with pytest.raises(HFWeightError, match=r"gate_proj\.weight_scale_inv: shape \(2, 2\), expected \(3, 1\)"):
        load_hf_weights(target, bad)


def test_errors_name_missing_unexpected_and_misshaped_keys():
    config = tiny(mtp_num_modules=0)
    model = build_model(config, seed=1)
    good = export_hf_weights(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    missing = {k: v for k, v in good.items() if k != "model.layers.2.mlp.experts.5.up_proj.weight"}
    with pytest.raises(HFWeightError, match=r"missing 1: model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load_hf_weights(model, missing)
    with pytest.raises(HFWeightError, match=r"missing 1: model\.norm\.weight"):
        load_hf_weights(model, {k: v for k, v in good.items() if k != "model.norm.weight"})
    with pytest.raises(HFWeightError, match=r"unexpected 1: model\.layers\.0\.mlp\.bogus\.weight"):
        load_hf_weights(model, dict(good, **{"model.layers.0.mlp.bogus.weight": torch.zeros(1)}))
    with pytest.raises(HFWeightError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight: checkpoint \(128, 65\)"):
        load_hf_weights(model, dict(good, **{"model.layers.1.self_attn.o_proj.weight": torch.zeros(128, 65)}))
    with pytest.raises(HFWeightError, match="both fused and per-expert"):
        fused_too = {"model.layers.1.mlp.experts.down_proj": model.layers["1"].mlp.experts.down_weight}
        load_hf_weights(model, dict(good, **fused_too))
    # A checkpoint with MTP weights loaded into a model without MTP names the cause.
    with_mtp = export_hf_weights(build_model(tiny(mtp_num_modules=1)))
    with pytest.raises(HFWeightError, match=r"layers \[3\] beyond num_layers=3: MTP"):
        load_hf_weights(model, with_mtp)
    for key, value in model.state_dict().items():  # nothing was copied by the failed calls
        assert torch.equal(value, before[key]), key

    # strict=False loads what matches and reports the rest.
    changed = {k: v + 1 for k, v in missing.items()}
    result = load_hf_weights(model, changed, strict=False)
    assert result.missing == ["model.layers.2.mlp.experts.5.up_proj.weight"] and result.unexpected == []
    assert torch.equal(model.norm.weight, before["norm.weight"] + 1)
    up = model.layers["2"].mlp.experts.gate_up_weight[5, config.moe_ffn_hidden_size:]
    assert torch.equal(up, before["layers.2.mlp.experts.gate_up_weight"][5, config.moe_ffn_hidden_size:])


def test_mtp_copy_that_differs_from_the_main_head_warns():
    config = tiny(mtp_num_modules=1)
    model = build_model(config, seed=1)
    exported = export_hf_weights(model)
    exported["model.layers.3.shared_head.head.weight"] = exported["lm_head.weight"] + 0.5
    with pytest.warns(MTPCopyMismatchWarning, match=r"shared_head\.head\.weight differs .*max abs diff 0\.5"):
        load_hf_weights(model, exported)
    del exported["model.layers.3.shared_head.head.weight"], exported["model.layers.3.embed_tokens.weight"]
    assert load_hf_weights(model, exported).mtp_copies_checked == []  # copies are optional


def test_sharded_model_is_refused(monkeypatch):
    from megatron_dsv3.parallel import groups

    model = build_model(tiny(mtp_num_modules=0))
    monkeypatch.setattr(groups, "layout", lambda: groups.ParallelLayout(tensor=2))
    with pytest.raises(NotImplementedError, match="unsharded model"):
        export_hf_weights(model)
    with pytest.raises(NotImplementedError, match="unsharded model"):
        load_hf_weights(model, {})


def test_checkpoint_directory_streams_shards_and_transformers_reads_it(tmp_path):
    config = tiny(mtp_num_modules=1)
    source = spice_routing(build_model(config, seed=1), seed=5).eval()
    files = save_hf_checkpoint(source, tmp_path, fused_experts=False, max_shard_bytes=200_000)
    assert len(files) > 3 and (tmp_path / "config.json").exists()
    target = build_model(config, seed=2)
    result = load_hf_checkpoint(target, tmp_path)
    assert result.missing == [] and result.unexpected == [] and len(result.mtp_copies_checked) == 2
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key

    ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    x = tokens(config)
    with torch.no_grad():
        diff = (ref(x).logits - source(x)).abs().max().item()
    print(f"save_hf_checkpoint -> transformers from_pretrained max abs logits diff {diff:.3g}")
    assert diff < TOL


def test_fp8_scale_in_another_shard_and_duplicate_keys(tmp_path):
    from safetensors.torch import save_file

    config = tiny(mtp_num_modules=0)
    weights = export_hf_weights(build_model(config, seed=1))
    q, s = quantize_blocks(weights["lm_head.weight"])
    weights["lm_head.weight"] = q
    names = sorted(weights)
    save_file({k: weights[k].contiguous() for k in names[:len(names) // 2]}, str(tmp_path / "a.safetensors"))
    save_file({k: weights[k].contiguous() for k in names[len(names) // 2:]}, str(tmp_path / "b.safetensors"))
    save_file({"lm_head.weight_scale_inv": s}, str(tmp_path / "c.safetensors"))  # no index: *.safetensors
    target = build_model(config, seed=2)
    result = load_hf_checkpoint(target, tmp_path)
    assert result.dequantized == ["lm_head.weight"]
    assert torch.equal(target.lm_head.weight, dequantize_fp8_blockwise(q, s))
    save_file({"model.norm.weight": weights["model.norm.weight"]}, str(tmp_path / "d.safetensors"))
    with pytest.raises(HFWeightError, match=r"model\.norm\.weight appears in both"):
        load_hf_checkpoint(target, tmp_path)


def test_mtp_module_matches_transformers_mtp_layer():
    from transformers.modeling_layers import MtpLayer

    config = tiny(mtp_num_modules=1)
    ours = spice_routing(build_model(config, seed=4), seed=4).eval()
    hf_config = config.to_hf()
    hf_config._attn_implementation = "eager"
    hf_config._experts_implementation = "eager"
    n = config.num_layers
    ref = MtpLayer(hf_config, hf_modeling.DeepseekV3DecoderLayer, hf_modeling.DeepseekV3RMSNorm, layer_idx=n).eval()
    prefix = f"model.layers.{n}."
    weights = {}
    for name, value in export_hf_weights(ours, fused_experts=True).items():
        if not name.startswith(prefix) or name.endswith(("embed_tokens.weight", "shared_head.head.weight")):
            continue
        rest = name[len(prefix):]
        rest = {"shared_head.norm.weight": "post_norm.weight"}.get(rest, rest)
        own = rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "post_norm")
        weights[rest if own else "mtp_block." + rest] = value
    ref.load_state_dict(weights, strict=True)

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, SEQ, config.hidden_size, generator=g)
    embedding = torch.randn(2, SEQ, config.hidden_size, generator=g)
    cos, sin = ours.rotary(torch.arange(SEQ))
    hf_rope = hf_modeling.DeepseekV3RotaryEmbedding(hf_config)(hidden, torch.arange(SEQ)[None])
    causal = torch.full((SEQ, SEQ), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        _, normed = ours.mtp[0](hidden, embedding, cos, sin)
        expected = ref(embedding, hidden, hf_rope, causal, torch.arange(SEQ)[None], None)
    diff = (normed - expected).abs().max().item()
    print(f"MTP module vs transformers MtpLayer max abs diff {diff:.3g}")
    assert diff < TOL
