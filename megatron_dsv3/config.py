"""DSV3Config: the DeepSeek-V3 architecture, its named presets and the Hugging Face mapping.

Every number of the presets comes from the technical report (arXiv 2412.19437, section 4.2
and table 1 of the appendix) or from DeepSeek's published configs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from megatron_dsv3 import registry


class ConfigError(ValueError):
    """An inconsistent configuration; the message names the offending field."""


@dataclass
class YarnConfig:
    """YaRN context extension (report section 4.3): frequency blend plus attention mscale."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass
class DSV3Config:
    # Embedding and trunk
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_layers: int = 61
    first_k_dense_layers: int = 3
    dense_ffn_hidden_size: int = 18432
    norm_eps: float = 1e-6
    init_std: float = 0.006
    max_position_embeddings: int = 4096
    # Multi-head Latent Attention (section 2.1.1)
    num_attention_heads: int = 128
    q_lora_rank: int = 1536  # 0 = plain query projection, no compression
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    yarn: Optional[YarnConfig] = None
    # DeepSeekMoE (section 2.1.2)
    num_routed_experts: int = 256
    num_shared_experts: int = 1
    num_experts_per_token: int = 8
    moe_ffn_hidden_size: int = 2048
    num_expert_groups: int = 8
    num_limited_groups: int = 4
    routed_scaling_factor: float = 2.5
    bias_update_rate: float = 0.001  # gamma of the auxiliary-loss-free balancing
    seq_aux_loss_coeff: float = 0.0001  # alpha of the complementary sequence-wise loss
    # Multi-Token Prediction (section 2.2)
    mtp_num_modules: int = 1
    mtp_loss_weight: float = 0.3  # lambda
    # Numerics: "none" (BF16/FP32) or "tile" (1x128 / 128x128 FP8, section 3.3)
    fp8: str = "none"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_layers

    def is_moe_layer(self, layer_index: int) -> bool:
        return layer_index >= self.first_k_dense_layers

    @property
    def softmax_scale(self) -> float:
        """(d_nope + d_rope)^-0.5, times mscale^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.yarn is not None and self.yarn.factor > 1:
            mscale = 0.1 * self.yarn.mscale_all_dim * math.log(self.yarn.factor) + 1.0
            scale *= mscale * mscale
        return scale

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DSV3Config":
        """A registered preset (`registry` kind "preset": the built-in ones and any a user
        registers) with `overrides` replacing fields (`yarn` may be given as a mapping)."""
        if name not in registry.names("preset"):
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(registry.names('preset'))}")
        config = dataclasses.replace(registry.get("preset", name), **_fields(cls, overrides, "model"))
        config.validate()
        return config

    # --------------------------------------------------------------- validation
    def validate(self, tensor_parallel_size: int = 1, expert_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1) -> "DSV3Config":
        """Refuse inconsistent values, naming the field. Returns self."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        _check_types(self)
        if self.yarn is not None:
            _check_types(self.yarn, "yarn.")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_routed_experts",
                     "num_experts_per_token", "moe_ffn_hidden_size", "dense_ffn_hidden_size",
                     "num_expert_groups", "num_limited_groups"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.q_lora_rank >= 0, f"q_lora_rank must be >= 0 (0 = no compression), got {self.q_lora_rank}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even for RoPE pairs, got {self.qk_rope_head_dim}")
        need(0 <= self.first_k_dense_layers <= self.num_layers,
             f"first_k_dense_layers={self.first_k_dense_layers} must lie in [0, num_layers={self.num_layers}]")
        need(self.num_shared_experts >= 0, f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        need(self.num_experts_per_token <= self.num_routed_experts,
             f"num_experts_per_token={self.num_experts_per_token} exceeds num_routed_experts={self.num_routed_experts}")
        need(self.num_routed_experts % self.num_expert_groups == 0,
             f"num_expert_groups={self.num_expert_groups} does not divide num_routed_experts={self.num_routed_experts}")
        need(self.num_limited_groups <= self.num_expert_groups,
             f"num_limited_groups (topk_group)={self.num_limited_groups} exceeds num_expert_groups={self.num_expert_groups}")
        experts_per_group = self.num_routed_experts // self.num_expert_groups
        if self.num_expert_groups > 1:
            need(experts_per_group >= 2,
                 f"num_expert_groups={self.num_expert_groups} leaves {experts_per_group} expert per group; "
                 "group scores sum the top-2 experts of each group")
        need(self.num_limited_groups * experts_per_group >= self.num_experts_per_token,
             f"num_limited_groups={self.num_limited_groups} groups of {experts_per_group} experts cannot hold "
             f"num_experts_per_token={self.num_experts_per_token}")
        need(self.mtp_num_modules >= 0, f"mtp_num_modules must be >= 0, got {self.mtp_num_modules}")
        need(self.mtp_loss_weight >= 0, f"mtp_loss_weight must be >= 0, got {self.mtp_loss_weight}")
        need(self.bias_update_rate >= 0, f"bias_update_rate must be >= 0, got {self.bias_update_rate}")
        need(self.seq_aux_loss_coeff >= 0, f"seq_aux_loss_coeff must be >= 0, got {self.seq_aux_loss_coeff}")
        need(self.fp8 in FP8_MODES, f"fp8={self.fp8!r} is not one of {FP8_MODES}")
        if self.yarn is not None:
            need(self.yarn.factor >= 1, f"yarn.factor must be >= 1, got {self.yarn.factor}")
            need(self.yarn.original_max_position_embeddings >= 1, "yarn.original_max_position_embeddings must be "
                 f"positive, got {self.yarn.original_max_position_embeddings}")
            need(self.yarn.beta_slow > 0, f"yarn.beta_slow must be positive, got {self.yarn.beta_slow}")
            need(self.yarn.mscale_all_dim >= 0, f"yarn.mscale_all_dim must be >= 0, got {self.yarn.mscale_all_dim}")
            need(self.yarn.beta_fast > self.yarn.beta_slow,
                 f"yarn.beta_fast={self.yarn.beta_fast} must exceed yarn.beta_slow={self.yarn.beta_slow}")
        need(min(tensor_parallel_size, expert_parallel_size, pipeline_parallel_size) >= 1, "parallel sizes must be >= 1")
        need(self.num_layers >= pipeline_parallel_size,
             f"num_layers={self.num_layers} cannot fill pipeline_parallel_size={pipeline_parallel_size} stages")
        need(self.num_attention_heads % tensor_parallel_size == 0,
             f"num_attention_heads={self.num_attention_heads} is not divisible by tensor_parallel_size={tensor_parallel_size}")
        for name in ("dense_ffn_hidden_size", "moe_ffn_hidden_size"):
            need(getattr(self, name) % tensor_parallel_size == 0,
                 f"{name}={getattr(self, name)} is not divisible by tensor_parallel_size={tensor_parallel_size}")
        need(self.num_routed_experts % expert_parallel_size == 0,
             f"num_routed_experts={self.num_routed_experts} is not divisible by expert_parallel_size={expert_parallel_size}")
        return self

    # ------------------------------------------------------------ Hugging Face
    def to_hf_dict(self, dtype: Optional[str] = None, token_ids: Optional[dict[str, Optional[int]]] = None,
                   fp8: bool = False) -> dict[str, Any]:
        """The fields of a Hugging Face `config.json` for this architecture: every field of DeepSeek-V3's
        release config, RoPE in the release's form (`rope_theta`, `rope_scaling` with "type") beside
        transformers 5's `rope_parameters`, and the routing that vLLM, SGLang and DeepSeek's reference
        read from it (`scoring_func` "sigmoid", `topk_method` "noaux_tc"). `dtype` ("bfloat16",
        "float32") is written as `torch_dtype` and `dtype`; `token_ids` (bos/eos/pad_token_id) come
        from the run's tokenizer; `fp8` adds the `quantization_config` of 128x128 block scales."""
        yarn = dataclasses.asdict(self.yarn) if self.yarn is not None else None
        values: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.dense_ffn_hidden_size, "moe_intermediate_size": self.moe_ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "first_k_dense_replace": self.first_k_dense_layers, "moe_layer_freq": 1,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank or None, "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim, "attention_bias": False, "attention_dropout": 0.0,
            "n_routed_experts": self.num_routed_experts, "n_shared_experts": self.num_shared_experts,
            "num_experts_per_tok": self.num_experts_per_token, "n_group": self.num_expert_groups,
            "topk_group": self.num_limited_groups, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
            "norm_topk_prob": True, "routed_scaling_factor": self.routed_scaling_factor, "ep_size": 1,
            "seq_aux": True, "aux_loss_alpha": self.seq_aux_loss_coeff,
            "num_nextn_predict_layers": self.mtp_num_modules, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.norm_eps,
            "initializer_range": self.init_std, "tie_word_embeddings": False, "use_cache": True,
            "rope_theta": self.rope_theta, "rope_scaling": None if yarn is None else {"type": "yarn", **yarn},
            "rope_parameters": {"rope_type": "yarn" if yarn else "default", "rope_theta": self.rope_theta,
                                **(yarn or {})},
            "rope_interleave": True,
        }
        if dtype is not None:
            values["torch_dtype"] = values["dtype"] = dtype
        values.update(token_ids or {})
        if fp8:
            values["quantization_config"] = dict(HF_FP8_QUANTIZATION)
        return values

    def to_hf(self):
        """A transformers DeepseekV3Config with the same architecture (`to_hf_dict`'s fields)."""
        from transformers import DeepseekV3Config  # optional dependency (a test extra), needed here only

        return DeepseekV3Config.from_dict(self.to_hf_dict())

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "DSV3Config":
        """Build from a transformers DeepseekV3Config or a config.json's fields (any object with their
        attribute names); RoPE from `rope_parameters`, from `rope_theta` + `rope_scaling`, or both when
        they agree. Routing other than DeepSeek-V3's (softmax scores, another top-k method,
        unnormalised gates) is refused by name."""
        get = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
        for name, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("norm_topk_prob", True)):
            if get(name) is not None and get(name) != want:
                raise ConfigError(f"{name}={get(name)!r} is not DeepSeek-V3 routing ({name}={want!r}); only "
                                  "sigmoid scores with the bias-corrected top-k and normalised gates are supported")
        theta, yarn = _rope_from_hf(get)
        mtp = get("num_nextn_predict_layers", None)
        if mtp is None:
            mtp = get("num_mtp_layers", 0)
        config = cls(
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_layers=get("num_hidden_layers"),
            first_k_dense_layers=get("first_k_dense_replace", 0), dense_ffn_hidden_size=get("intermediate_size"),
            norm_eps=get("rms_norm_eps", 1e-6), init_std=get("initializer_range", 0.006),
            max_position_embeddings=get("max_position_embeddings", 4096),
            num_attention_heads=get("num_attention_heads"), q_lora_rank=get("q_lora_rank") or 0,
            kv_lora_rank=get("kv_lora_rank"), qk_nope_head_dim=get("qk_nope_head_dim"),
            qk_rope_head_dim=get("qk_rope_head_dim"), v_head_dim=get("v_head_dim"), rope_theta=theta, yarn=yarn,
            num_routed_experts=get("n_routed_experts"), num_shared_experts=get("n_shared_experts", 0) or 0,
            num_experts_per_token=get("num_experts_per_tok"), moe_ffn_hidden_size=get("moe_intermediate_size"),
            num_expert_groups=get("n_group", 1) or 1, num_limited_groups=get("topk_group", 1) or 1,
            routed_scaling_factor=get("routed_scaling_factor", 1.0), mtp_num_modules=mtp,
        )
        config = dataclasses.replace(config, **overrides)
        return config.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DSV3Config":
        if not isinstance(values, dict):
            raise ConfigError(f"a model config must be a mapping of fields, got {type(values).__name__}")
        return cls(**_fields(cls, values, "model config")).validate()


HF_FP8_QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [128, 128]}  # DeepSeek-V3's release: 128x128 weight_scale_inv
ROPE_TYPES = ("default", "yarn")


def _rope_form(rope: Any, key: str, theta: Any) -> tuple[Any, Optional[YarnConfig]]:
    """(theta, YaRN) of one RoPE mapping (`key` names it in errors); `theta` when it has none."""
    if not isinstance(rope, dict):
        raise ConfigError(f"{key} must be a mapping, got {rope!r}"[:300])
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{key} type {kind!r} is not supported (one of {', '.join(ROPE_TYPES)})")
    theta = rope.get("rope_theta", theta)
    if kind == "default":
        return theta, None
    if "factor" not in rope:
        raise ConfigError(f"{key} is YaRN without a factor")
    return theta, YarnConfig(
        factor=rope["factor"], original_max_position_embeddings=rope.get("original_max_position_embeddings", 4096),
        beta_fast=rope.get("beta_fast", 32.0), beta_slow=rope.get("beta_slow", 1.0), mscale=rope.get("mscale", 1.0),
        mscale_all_dim=rope.get("mscale_all_dim", 0.0))


def _rope_from_hf(get) -> tuple[Any, Optional[YarnConfig]]:
    """(rope_theta, YaRN) from transformers 5's `rope_parameters` and/or the release form (`rope_theta`
    + `rope_scaling`, its "type" key); ConfigError when both are given and disagree."""
    theta = get("rope_theta", 10000.0)
    forms = []
    if get("rope_parameters") is not None:
        forms.append(("rope_parameters", _rope_form(get("rope_parameters"), "rope_parameters", theta)))
    if get("rope_scaling") is not None or not forms:
        forms.append(("rope_scaling", _rope_form(get("rope_scaling") or {}, "rope_scaling", theta)))
    (first, read), (second, other) = forms[0], forms[-1]
    if read != other:
        raise ConfigError(f"{first} and {second} (with rope_theta) disagree: {read} vs {other}")
    return read


MAX_SIZE = 2**31 - 1  # sizes, counts and dimensions: what an index into one tensor dimension may be


def _fields(cls: type, values: dict[str, Any], what: str) -> dict[str, Any]:
    """`values` as keyword arguments of `cls`: unknown names refused, `yarn` built from a mapping."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(values) - names))
    if unknown:
        raise ConfigError(f"unknown {what} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = dict(values)
    for f in dataclasses.fields(cls):  # floats as floats: 4 -> 4.0; YAML 1.1 reads 1e-3 or 1.0e30 as text
        value = values.get(f.name)
        if f.type == "float" and (isinstance(value, str) or type(value) is int):
            try:
                values[f.name] = float(value)
            except (ValueError, OverflowError):
                pass  # refused by name in validate
    if isinstance(values.get("yarn"), dict):
        values["yarn"] = YarnConfig(**_fields(YarnConfig, values["yarn"], "yarn"))
    elif values.get("yarn") is not None and not isinstance(values["yarn"], YarnConfig):
        raise ConfigError(f"yarn must be a mapping of {', '.join(f.name for f in dataclasses.fields(YarnConfig))} "
                          f"or null, got {values['yarn']!r}")
    return values


def _check_types(config: Any, prefix: str = "") -> None:
    """Integer fields hold integers in [0, MAX_SIZE], float fields finite numbers, strings strings."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SIZE
            want = f"an integer in [0, {MAX_SIZE}]"
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        elif kind == "str":
            ok, want = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ConfigError(f"{prefix}{f.name} must be {want}, got {value!r}")


FP8_MODES = ("none", "tile")
RECOMPUTE_MODES = ("none", "selective", "full")  # activation recomputation in backward (DSV3Model.recompute)

PRESETS: dict[str, DSV3Config] = {
    "deepseek-v3-671b": DSV3Config(),
    "deepseek-v3-lite": DSV3Config(
        vocab_size=102400, hidden_size=2048, num_layers=27, first_k_dense_layers=1, dense_ffn_hidden_size=10944,
        num_attention_heads=16, q_lora_rank=0, kv_lora_rank=512, num_routed_experts=64, num_shared_experts=2,
        num_experts_per_token=6, moe_ffn_hidden_size=1408, num_expert_groups=1, num_limited_groups=1,
        routed_scaling_factor=1.0, init_std=0.006),
    # CPU performance work (71 M parameters): the lite preset's ratios at hidden 384 (3 heads of its
    # head dims, kv_lora_rank and FFN widths scaled with hidden, 64 experts top-6 + 2 shared), 3 layers
    # (1 dense); benchmarked at 8 x 256 tokens (scripts/bench_step.py), where GEMMs dominate the step.
    "small": DSV3Config(
        vocab_size=8192, hidden_size=384, num_layers=3, first_k_dense_layers=1, dense_ffn_hidden_size=2052,
        max_position_embeddings=1024, num_attention_heads=3, q_lora_rank=0, kv_lora_rank=96,
        num_routed_experts=64, num_shared_experts=2, num_experts_per_token=6, moe_ffn_hidden_size=264,
        num_expert_groups=1, num_limited_groups=1, routed_scaling_factor=1.0, init_std=0.02),
    # Trains on a laptop CPU: 3 layers (1 dense), 8 experts in 4 groups, one MTP module.
    "tiny": DSV3Config(
        vocab_size=320, hidden_size=128, num_layers=3, first_k_dense_layers=1, dense_ffn_hidden_size=320,
        max_position_embeddings=512, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, num_routed_experts=8, num_shared_experts=1,
        num_experts_per_token=2, moe_ffn_hidden_size=64, num_expert_groups=4, num_limited_groups=2,
        routed_scaling_factor=2.5, init_std=0.02, bias_update_rate=0.01),
}
for _name, _preset in PRESETS.items():
    registry.register("preset", _name, _preset)
