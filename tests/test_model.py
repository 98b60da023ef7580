"""The DeepSeek-V3 model on one CPU process: MLA, routing, MTP and the loss they make up."""
import dataclasses

import pytest
import torch

from megatron_dsv3 import ConfigError, DSV3Config, YarnConfig, build_model
from megatron_dsv3.model.mla import InferenceCache
from megatron_dsv3.model.moe.router import Router, update_expert_bias
from megatron_dsv3.model.mtp import mtp_loss
from megatron_dsv3.monitor.activations import bytes_kept_for_backward


def tiny(**overrides) -> DSV3Config:
    return DSV3Config.preset("tiny", **overrides)


def batch(config, b=2, s=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (b, s + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def max_vio(load: torch.Tensor) -> float:
    return float(load.max() / load.float().mean() - 1)


def test_logits_shape_and_loss_is_lm_plus_weighted_mtp_plus_balance():
    config = tiny(mtp_num_modules=2, mtp_loss_weight=0.3, seq_aux_loss_coeff=0.01)
    model = build_model(config)
    tokens, labels = batch(config)
    assert model(tokens).shape == (2, 24, config.vocab_size)
    out = model(tokens, labels=labels)
    assert len(out.mtp_losses) == 2 and out.balance_loss is not None and out.balance_loss > 0
    expected = out.lm_loss + 0.3 / 2 * sum(out.mtp_losses) + out.balance_loss
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-6, atol=1e-6)


def test_mtp_weight_zero_leaves_only_lm_loss_and_balance_gradient_is_attached():
    config = tiny(mtp_loss_weight=0.0, seq_aux_loss_coeff=0.0)
    model = build_model(config)
    tokens, labels = batch(config)
    out = model(tokens, labels=labels)
    torch.testing.assert_close(out.loss.detach(), out.lm_loss)
    # With alpha > 0 the router weight receives gradient from the balance loss alone.
    config = tiny(mtp_loss_weight=0.0, seq_aux_loss_coeff=1.0)
    model = build_model(config)
    for p in model.parameters():
        p.requires_grad_(False)
    router = model.routers()[0]
    router.weight.requires_grad_(True)
    model(tokens, labels=labels)  # loss value needs no grad; the balance gradient is attached in-layer
    hidden = torch.randn(2, 24, config.hidden_size)
    routing = router(hidden)
    routing.balance_loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("q_lora_rank,yarn", [(64, None), (0, None), (64, YarnConfig(factor=4.0, original_max_position_embeddings=16))])
def test_absorbed_inference_attention_equals_training_attention(q_lora_rank, yarn):
    config = tiny(q_lora_rank=q_lora_rank, yarn=yarn)
    model = build_model(config, seed=3).eval()
    tokens, _ = batch(config, s=20)
    with torch.no_grad():
        full = model(tokens)
        cache = InferenceCache()
        pieces = [model(tokens[:, :12], cache=cache)]
        for i in range(12, 20):
            pieces.append(model(tokens[:, i:i + 1], cache=cache))
    incremental = torch.cat(pieces, dim=1)
    assert (incremental - full).abs().max() < 1e-4
    layer_cache = cache.layer(0)
    assert layer_cache.elements_per_token == config.kv_lora_rank + config.qk_rope_head_dim
    assert layer_cache.latent.shape == (2, 20, config.kv_lora_rank)
    assert layer_cache.rope_key.shape == (2, 20, config.qk_rope_head_dim)


def test_v3_cache_per_token_matches_the_report():
    config = DSV3Config.preset("deepseek-v3-671b")
    per_token_layer = config.kv_lora_rank + config.qk_rope_head_dim
    assert per_token_layer == 576
    assert per_token_layer * config.num_layers * 2 == 70_272  # BF16 bytes per token over 61 layers


def test_yarn_scales_softmax_by_mscale_squared():
    config = tiny(yarn=YarnConfig(factor=40.0))
    mscale = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1  # 1.3689
    assert config.softmax_scale == pytest.approx(config.qk_head_dim ** -0.5 * mscale ** 2)


def test_gates_use_unbiased_scores_and_bias_only_changes_selection():
    config = tiny(num_expert_groups=1, num_limited_groups=1)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(1, 64, config.hidden_size)
    plain = router(x)
    router.expert_bias[3] = 10.0  # expert 3 is now always chosen
    biased = router(x)
    assert (biased.expert_ids == 3).any(dim=-1).all()
    assert not torch.equal(plain.expert_ids, biased.expert_ids)
    scores = torch.sigmoid(x.flatten(0, 1) @ router.weight.t())
    for routing in (plain, biased):
        chosen = scores.gather(1, routing.expert_ids)
        expected = chosen / chosen.sum(-1, keepdim=True) * config.routed_scaling_factor
        torch.testing.assert_close(routing.gates, expected)


def test_group_limited_routing_keeps_tokens_inside_the_best_groups():
    config = tiny(num_routed_experts=16, num_expert_groups=8, num_limited_groups=2, num_experts_per_token=3)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=1.0)
    router.expert_bias.normal_()
    x = torch.randn(4, 50, config.hidden_size)
    ids = router(x).expert_ids
    groups_per_token = (ids // 2).sort(dim=-1).values
    distinct = (groups_per_token.diff(dim=-1) != 0).sum(dim=-1) + 1
    assert distinct.max() <= 2
    # The kept groups are those with the largest sum of their top-2 biased scores.
    biased = torch.sigmoid(x.flatten(0, 1) @ router.weight.t()) + router.expert_bias
    best = biased.view(-1, 8, 2).sum(-1).topk(2, dim=-1).indices.sort(-1).values
    for token in range(ids.shape[0]):
        assert set((ids[token] // 2).tolist()) <= set(best[token].tolist())


def test_bias_update_balances_a_skewed_router_without_aux_loss():
    """alpha = 0: only the +-gamma bias steps act, and MaxVio falls over the steps while the gates
    keep coming from the unbiased scores."""
    config = tiny(seq_aux_loss_coeff=0.0, num_expert_groups=1, num_limited_groups=1)
    router = Router(config).train()
    torch.nn.init.normal_(router.weight, std=0.1)
    g = torch.Generator().manual_seed(0)
    typical = torch.randn(config.hidden_size, generator=g)
    typical /= typical.norm()
    with torch.no_grad():  # experts 0 and 1 get +3 logits on typical tokens
        router.weight[:2] += 1.5 * typical
    vios = []
    for step in range(80):
        x = torch.randn(1, 2048, config.hidden_size, generator=g) + 2 * typical
        routing = router(x)
        assert routing.balance_loss is None
        (load,) = update_expert_bias([router], rate=0.01)
        vios.append(max_vio(load))
    assert vios[0] > 2.5, vios  # nearly every token picks experts 0 and 1 (MaxVio 3 = all of them)
    assert sum(vios[-10:]) / 10 < 0.4, vios
    assert router.expert_bias[:2].max() < 0 < router.expert_bias[2:].min()


def test_bias_update_applies_sign_of_mean_minus_load():
    router = Router(tiny())
    router.tokens_per_expert.copy_(torch.tensor([10., 0, 5, 5, 5, 5, 5, 5]))
    (load,) = update_expert_bias([router], rate=0.1)
    assert load.tolist() == [10., 0, 5, 5, 5, 5, 5, 5]
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0, 0, 0, 0, 0, 0]))
    assert router.tokens_per_expert.sum() == 0


def test_mtp_gradients_reach_the_shared_embedding_and_head():
    config = tiny(mtp_num_modules=1)
    model = build_model(config)
    mtp_param_ids = {id(p) for p in model.mtp.parameters()}
    assert id(model.embed_tokens.weight) not in mtp_param_ids and id(model.lm_head.weight) not in mtp_param_ids
    tokens, labels = batch(config)
    cos, sin = model.rotary(torch.arange(tokens.shape[1]))
    hidden = torch.randn(2, tokens.shape[1], config.hidden_size, requires_grad=True)
    (loss,) = mtp_loss(model.mtp, hidden, tokens, labels, model.embed_tokens, model.lm_head, cos, sin)
    loss.backward()
    assert model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert hidden.grad.abs().sum() > 0
    # Depth 1 embeds labels[i] and is scored on labels[i + 1]: rows of tokens never seen as labels get no gradient.
    unseen = sorted(set(range(config.vocab_size)) - set(labels.flatten().tolist()))
    assert model.embed_tokens.weight.grad[unseen].abs().sum() == 0


def test_mtp_is_left_out_of_inference_outputs():
    config = tiny(mtp_num_modules=1)
    model = build_model(config).eval()
    tokens, _ = batch(config)
    with torch.no_grad():
        logits = model(tokens)
        model.mtp = torch.nn.ModuleList()
        torch.testing.assert_close(model(tokens), logits)


@pytest.mark.parametrize("overrides,field", [
    ({"num_experts_per_token": 9}, "num_experts_per_token"),
    ({"num_expert_groups": 3}, "num_expert_groups"),
    ({"num_limited_groups": 5}, "num_limited_groups"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
    ({"first_k_dense_layers": 7}, "first_k_dense_layers"),
    ({"fp8": "e5m2"}, "fp8"),
])
def test_inconsistent_config_is_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        tiny(**overrides)


def test_parallel_sizes_are_checked_against_heads_and_experts():
    config = tiny()
    with pytest.raises(ConfigError, match="tensor_parallel_size=3"):
        config.validate(tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="expert_parallel_size=3"):
        config.validate(expert_parallel_size=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        DSV3Config.preset("deepseek-v4")


def test_presets_have_the_published_shapes():
    v3 = DSV3Config.preset("deepseek-v3-671b")
    assert (v3.hidden_size, v3.num_layers, v3.num_routed_experts, v3.num_experts_per_token) == (7168, 61, 256, 8)
    lite = DSV3Config.preset("deepseek-v3-lite")
    assert (lite.q_lora_rank, lite.num_routed_experts, lite.num_shared_experts) == (0, 64, 2)
    round_trip = DSV3Config.from_dict(dataclasses.asdict(tiny(yarn=YarnConfig())))
    assert round_trip == tiny(yarn=YarnConfig())


def test_recompute_modes_give_the_same_loss_gradients_and_routing_load_and_keep_less():
    """selective reruns RMSNorm, MLA up-projections and SwiGLU outputs in backward; full reruns each
    decoder layer. Same numbers, each token's routing counted once, and fewer bytes kept."""
    config = DSV3Config.preset("tiny", seq_aux_loss_coeff=1e-3)
    tokens = torch.randint(0, config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(5))
    runs = {}
    for mode in ("none", "selective", "full"):
        model = build_model(config, seed=2).train()
        model.recompute = mode
        out, kept = bytes_kept_for_backward(model, lambda: model(tokens[:, :-1], labels=tokens[:, 1:]))
        out.loss.backward()
        load = torch.stack([r.tokens_per_expert for r in model.routers()])
        runs[mode] = (out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}, load, kept)
    loss_a, grads_a, load_a, kept_none = runs["none"]
    for mode in ("selective", "full"):
        loss_b, grads_b, load_b, _ = runs[mode]
        assert torch.equal(loss_a, loss_b), mode
        for name, grad in grads_a.items():
            torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{mode} {name}: {m}")
        assert torch.equal(load_a, load_b), mode
    assert load_a.sum() == load_a.shape[0] * 2 * 64 * config.num_experts_per_token  # routers x tokens x top-k
    kept_selective, kept_full = runs["selective"][3], runs["full"][3]
    assert kept_full < kept_selective < 0.8 * kept_none, (kept_none, kept_selective, kept_full)
    with pytest.raises(ValueError, match="recompute='partial' is not one of"):
        model.recompute = "partial"
