"""dsv3-convert dist-to-hf of a dsv3-train run, read as DeepSeek's code, vLLM, SGLang and transformers
read it: config.json with DeepSeek-V3's release fields and this model's values, the routing bias in
FP32 bitwise through BF16 and FP8 exports and back, both RoPE forms imported, and the run's tokenizer
beside the weights (copied from its tokenizer.json, or the byte tokenizer named in a note).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megatron_dsv3.config import ConfigError, DSV3Config, YarnConfig
from megatron_dsv3.convert import DistReader, dist_to_hf, hf_to_dist
from megatron_dsv3.convert.hf_to_dist import config_from_json
from megatron_dsv3.convert.safetensors_io import read_headers, read_tensor

YARN = {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
        "mscale_all_dim": 1.0}
BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run with YaRN: 3 steps whose bias updates leave biases BF16 cannot hold. Returns its
    checkpoint.dir (iter_0000003 and run_config.yaml, byte tokenizer)."""
    from megatron_dsv3.compat.megatron_checkpoint import signal_safe_checkpoint_writer
    from megatron_dsv3.train import main

    root = tmp_path_factory.mktemp("run")
    with signal_safe_checkpoint_writer():
        code = main(["train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=3",
                     "train.warmup_steps=1", "checkpoint.save_interval=0", "logging.jsonl=false", "train.device=cpu",
                     "logging.console=false", "model.overrides.bias_update_rate=0.0123",
                     f"model.overrides.yarn={json.dumps(YARN)}", f"data.cache_dir={root / 'cache'}",
                     f"checkpoint.dir={root / 'ckpt'}"])
    assert code == 0
    return root / "ckpt"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: read_tensor(entry) for name, entry in read_headers(folder).items()}


def _convert(capsys, *argv: str) -> tuple[int, str, str]:
    from megatron_dsv3.cli.convert import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- config.json
# DeepSeek-V3's released config.json, the fields a reader routes and positions with
RELEASE = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16",
           "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "norm_topk_prob": True,
           "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1, "first_k_dense_replace": 3,
           "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "rope_theta": 10000,
           "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]},
           "tie_word_embeddings": False}


def test_the_671b_preset_writes_deepseek_v3s_release_values():
    values = DSV3Config.preset("deepseek-v3-671b", yarn=YarnConfig()).to_hf_dict("bfloat16", fp8=True)
    assert {key: values[key] for key in RELEASE} == RELEASE
    yarn = {k: v for k, v in RELEASE["rope_scaling"].items() if k != "type"}
    assert values["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 10000, **yarn}  # transformers 5's form


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_an_exports_config_json_holds_every_release_field_with_this_models_values(fp8, run, tmp_path):
    from transformers import AutoConfig

    dist_to_hf(run / "iter_0000003", tmp_path / "hf", fp8=fp8)
    values = json.loads((tmp_path / "hf" / "config.json").read_text())
    model = DSV3Config.from_dict(DistReader(run / "iter_0000003").common["model_config"])
    want = {**RELEASE, "n_group": model.num_expert_groups, "topk_group": model.num_limited_groups,
            "routed_scaling_factor": model.routed_scaling_factor, "num_nextn_predict_layers": model.mtp_num_modules,
            "first_k_dense_replace": model.first_k_dense_layers, "n_routed_experts": model.num_routed_experts,
            "num_experts_per_tok": model.num_experts_per_token, "n_shared_experts": model.num_shared_experts,
            "rope_scaling": {"type": "yarn", **YARN}}
    if not fp8:
        del want["quantization_config"]
        assert "quantization_config" not in values
    assert {key: values[key] for key in want} == want
    assert values["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 10000.0, **YARN}
    assert (values["bos_token_id"], values["eos_token_id"], values["pad_token_id"]) == (None, 256, 257)
    assert (values["vocab_size"], values["hidden_size"], values["q_lora_rank"]) == (320, 128, 64)

    # transformers reads it, and so does our import: the same model
    hf = AutoConfig.from_pretrained(tmp_path / "hf")
    assert (hf.topk_method, hf.scoring_func, hf.rope_parameters["rope_type"], hf.rope_parameters["factor"]) == \
        ("noaux_tc", "sigmoid", "yarn", 4.0)
    training = {name: getattr(model, name) for name in ("bias_update_rate", "seq_aux_loss_coeff", "mtp_loss_weight")}
    assert DSV3Config.from_hf(hf, **training) == model
    assert config_from_json(values, "config.json") == DSV3Config.from_hf(hf)


# ----------------------------------------------------------------------------- the routing bias
def test_the_routing_bias_is_fp32_and_bitwise_through_bf16_and_fp8_exports_and_back(run, tmp_path):
    trained = DistReader(run / "iter_0000003").read("model.layers.1.mlp.router.expert_bias")
    assert trained.dtype == torch.float32 and not torch.equal(trained.bfloat16().float(), trained)
    for fp8 in (False, True):
        out = tmp_path / f"hf-{fp8}"
        dist_to_hf(run / "iter_0000003", out, fp8=fp8, dtype=torch.bfloat16)
        tensors = _tensors(out)
        assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
        assert tensors[BIAS].dtype == torch.float32 and torch.equal(tensors[BIAS], trained), fp8
        assert all(t.dtype == torch.float32 for n, t in tensors.items() if n.endswith("e_score_correction_bias"))

    hf_to_dist(tmp_path / "hf-False", tmp_path / "dist-bf16", dtype=torch.bfloat16)  # back, in BF16
    back = DistReader(tmp_path / "dist-bf16")
    assert back.dtype("model.layers.1.mlp.router.expert_bias") == torch.float32
    assert back.dtype("model.layers.1.mlp.router.weight") == torch.bfloat16
    assert torch.equal(back.read("model.layers.1.mlp.router.expert_bias"), trained)
    dist_to_hf(tmp_path / "dist-bf16", tmp_path / "again", tokenizer="byte")
    assert torch.equal(_tensors(tmp_path / "again")[BIAS], trained)


# ----------------------------------------------------------------------------- RoPE forms
def _config_values(run: Path, tmp_path: Path) -> dict:
    dist_to_hf(run / "iter_0000003", tmp_path / "hf")
    return json.loads((tmp_path / "hf" / "config.json").read_text())


def test_the_import_reads_either_rope_form_and_refuses_a_disagreement(run, tmp_path):
    values = _config_values(run, tmp_path)
    both = config_from_json(values, "config.json")
    assert both.yarn == YarnConfig(**YARN) and both.rope_theta == 10000.0
    release = {k: v for k, v in values.items() if k != "rope_parameters"}  # DeepSeek-V3's release form only
    newer = {k: v for k, v in values.items() if k not in ("rope_scaling", "rope_theta")}  # transformers 5's only
    assert config_from_json(release, "config.json") == config_from_json(newer, "config.json") == both
    plain = {**values, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert config_from_json(plain, "config.json").yarn is None
    assert config_from_json(plain, "config.json").rope_theta == 5e5

    refused = {
        "disagree": ({**values, "rope_scaling": {**values["rope_scaling"], "factor": 8}},
                     "rope_parameters and rope_scaling (with rope_theta) disagree"),
        "type": ({**release, "rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling type 'linear' is not"),
        "no factor": ({**newer, "rope_parameters": {"rope_type": "yarn"}}, "rope_parameters is YaRN without a factor"),
        "softmax": ({**values, "scoring_func": "softmax"}, "scoring_func='softmax' is not DeepSeek-V3 routing"),
        "greedy": ({**values, "topk_method": "greedy"}, "topk_method='greedy' is not DeepSeek-V3 routing"),
        "not a mapping": ({**release, "rope_scaling": [1]}, "rope_scaling must be a mapping"),
    }
    for case, (edited, message) in refused.items():
        with pytest.raises(ConfigError) as error:
            config_from_json(edited, "x/config.json")
        assert str(error.value).startswith("x/config.json: ") and message in str(error.value), case


# ----------------------------------------------------------------------------- the tokenizer
def test_a_byte_tokenizer_run_gets_a_note_in_the_export_and_the_output(run, tmp_path, capsys):
    code, out, err = _convert(capsys, "dist-to-hf", str(run / "iter_0000003"), str(tmp_path / "hf"))
    assert code == 0, err
    note = "tokenizer: trained on the byte tokenizer (UTF-8 bytes: ids 0-255 are the bytes, 256 ends a document"
    assert note in out and note in (tmp_path / "hf" / "README.md").read_text()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dsv3_tokenizer"] == "byte"
    assert not list((tmp_path / "hf").glob("tokenizer*"))


def _word_tokenizer(path: Path) -> Path:
    import tokenizers
    from tokenizers import models, pre_tokenizers

    words = ["<unk>", "<s>", "<|endoftext|>", "<pad>", "def", "return", "self", "import", "(", ")", ":"]
    tokenizer = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def _run_with_tokenizer(run: Path, root: Path, spec: str) -> Path:
    """The run's checkpoint under a run_config.yaml whose data.tokenizer is `spec`."""
    shutil.copytree(run / "iter_0000003", root / "ckpt" / "iter_0000003")
    values = yaml.safe_load((run / "run_config.yaml").read_text())
    values["data"]["tokenizer"] = spec
    (root / "ckpt" / "run_config.yaml").write_text(yaml.safe_dump(values))
    return root / "ckpt" / "iter_0000003"


def test_a_tokenizer_json_run_gets_its_tokenizer_copied_beside_the_weights(run, tmp_path, capsys):
    from transformers import AutoTokenizer

    source = _word_tokenizer(tmp_path / "tok" / "tokenizer.json")
    checkpoint = _run_with_tokenizer(run, tmp_path, str(source))
    code, out, err = _convert(capsys, "dist-to-hf", str(checkpoint), str(tmp_path / "hf"))
    assert code == 0, err
    assert f"tokenizer: copied {source}" in out
    export = tmp_path / "hf"
    assert (export / "tokenizer.json").read_bytes() == source.read_bytes()
    values = json.loads((export / "config.json").read_text())
    assert (values["bos_token_id"], values["eos_token_id"], values["pad_token_id"]) == (1, 2, 3)
    assert "dsv3_tokenizer" not in values
    loaded = AutoTokenizer.from_pretrained(export)
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == ("<|endoftext|>", "<pad>", "<s>")
    assert loaded("def f ( self ) :", add_special_tokens=False)["input_ids"] == [4, 0, 8, 6, 9, 10]

    # its own tokenizer_config.json, when it has one, travels with it
    (source.parent / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                     "chat_template": "{{ messages }}"}))
    dist_to_hf(checkpoint, export, replace=True)
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"


def test_a_missing_tokenizer_is_said_and_a_bad_tokenizer_option_refused(run, tmp_path, capsys):
    checkpoint = _run_with_tokenizer(run, tmp_path, str(tmp_path / "gone" / "tokenizer.json"))
    code, out, err = _convert(capsys, "dist-to-hf", str(checkpoint), str(tmp_path / "hf"))
    assert code == 0, err
    assert "tokenizer: NOT exported: tokenizer file not found" in out
    assert "NOT exported" in (tmp_path / "hf" / "README.md").read_text()
    code, out, err = _convert(capsys, "dist-to-hf", str(checkpoint), str(tmp_path / "hf2"), "--tokenizer",
                              str(tmp_path / "nope.json"))
    assert code == 2 and "tokenizer file not found" in err and not (tmp_path / "hf2").exists(), err


# ----------------------------------------------------------------------------- FP8 and transformers
def test_transformers_dequantises_partial_blocks_wrongly_without_the_shim_and_right_with_it():
    """The README's caveat: a [192, 256] FP8 weight (2 x 2 scale blocks, the last row of blocks 64
    rows deep) is read by transformers 5.x in 96-row blocks without a word; inside
    fp8_partial_blocks() it is read in DeepSeek's 128 x 128 blocks."""
    from megatron_dsv3.compat.transformers_fp8 import fp8_partial_blocks
    from megatron_dsv3.fp8 import dequantize_blocks, quantize_blocks

    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    weight = torch.randn(192, 256, generator=torch.Generator().manual_seed(1))
    weight[128:] *= 8  # the edge blocks' scale differs from the first row of blocks'
    q, scale = quantize_blocks(weight)
    right = dequantize_blocks(q, scale)
    reader = object.__new__(fp8.Fp8Dequantize)
    if not hasattr(reader, "_dequantize_one"):
        pytest.skip("this transformers has no Fp8Dequantize._dequantize_one")
    wrong = reader._dequantize_one(q, scale, output_dtype=torch.float32)
    assert (wrong - right).norm() / right.norm() > 0.1
    with fp8_partial_blocks():
        assert torch.equal(reader._dequantize_one(q, scale, output_dtype=torch.float32), right)
