"""dsv3-convert: Hugging Face checkpoints written by transformers' save_pretrained (multi-shard; BF16,
an FP8 variant quantised here with 128x128 weight_scale_inv, and a variant with MTP tensors added
by hand) -> a distributed checkpoint -> dsv3-train under TP2xEP2 and PP2 (its first LM loss equals
transformers' on the same batch) -> Hugging Face again (exact for BF16, and for FP8: re-quantising
dequantised blocks gives the same codes and scales) -> transformers' from_pretrained, same logits.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_dsv3 import DSV3Config, build_model
from megatron_dsv3.compat.transformers_fp8 import fp8_partial_blocks
from megatron_dsv3.convert import DistReader, dist_to_hf, hf_to_dist
from megatron_dsv3.convert.dist_to_hf import FP8_WEIGHTS, QUANTIZATION_CONFIG
from megatron_dsv3.convert.safetensors_io import read_header, read_headers, read_tensor
from megatron_dsv3.fp8 import quantize_blocks
from megatron_dsv3.fp8.quantize import expand_block_scales
from megatron_dsv3.convert.hf import dequantize_fp8_blockwise, iter_hf_weights

from transformers import DeepseekV3ForCausalLM
from safetensors.torch import load_file, save_file

from helpers.distributed import run_ranks

# tiny: hidden 128 and the dense FFN's 320 rows give whole and partial (padded) 128x128 blocks.
CONFIG = DSV3Config.preset("tiny", seq_aux_loss_coeff=0.0, mtp_num_modules=0)
SHARD = "300KB"  # six shards


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {name: read_tensor(entry) for name, entry in read_headers(directory).items()}


def _rewrite_index(directory: Path) -> None:
    weight_map = {name: path.name for path in sorted(directory.glob("*.safetensors")) for name in read_header(path)}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def reference() -> DeepseekV3ForCausalLM:
    """transformers' model with routing that varies by token and a mostly negative routing bias."""
    torch.manual_seed(3)
    model = DeepseekV3ForCausalLM._from_config(CONFIG.to_hf(), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers[CONFIG.first_k_dense_layers:]:
            layer.mlp.gate.weight.normal_(0, 0.15)
            layer.mlp.gate.e_score_correction_bias.normal_(-0.6, 0.2)
        for name, tensor in model.state_dict().items():  # BF16 values: the BF16 checkpoint holds exactly this model
            if not name.endswith("e_score_correction_bias"):  # which keeps its routing bias in FP32, as DeepSeek's
                tensor.copy_(tensor.bfloat16().float())
    return model.eval()


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory, reference) -> Path:
    """DeepSeek's layout: BF16 weights, the routing bias in FP32 (values BF16 cannot hold)."""
    path = tmp_path_factory.mktemp("hf_bf16")
    model = copy.deepcopy(reference).to(torch.bfloat16)
    for ours, theirs in zip(model.model.layers[CONFIG.first_k_dense_layers:],
                            reference.model.layers[CONFIG.first_k_dense_layers:]):
        bias = theirs.mlp.gate.e_score_correction_bias
        assert not torch.equal(bias.bfloat16().float(), bias)
        ours.mlp.gate.register_buffer("e_score_correction_bias", bias.clone())
    model.save_pretrained(path, max_shard_size=SHARD)
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


@pytest.fixture(scope="module")
def hf_fp8(tmp_path_factory, hf_bf16) -> Path:
    """The BF16 folder with every projection weight as float8 + weight_scale_inv, shard by shard."""
    path = tmp_path_factory.mktemp("hf_fp8")
    for shard in sorted(hf_bf16.glob("*.safetensors")):
        out = {}
        for name, tensor in load_file(shard).items():
            if FP8_WEIGHTS.match(name):
                q, scale = quantize_blocks(tensor.float(), name=name)
                out[name], out[name + "_scale_inv"] = q.contiguous(), scale.contiguous()
            else:
                out[name] = tensor
        save_file(out, path / shard.name, metadata={"format": "pt"})
    _rewrite_index(path)
    config = json.loads((hf_bf16 / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": QUANTIZATION_CONFIG}))
    return path


@pytest.fixture(scope="module")
def hf_mtp(tmp_path_factory, hf_bf16) -> Path:
    """The BF16 folder plus one MTP module at layer num_hidden_layers, in a shard of its own."""
    path = tmp_path_factory.mktemp("hf_mtp")
    for file in hf_bf16.iterdir():
        shutil.copy(file, path / file.name)
    main = _tensors(hf_bf16)
    mtp_model = build_model(DSV3Config.from_dict({**CONFIG.to_dict(), "mtp_num_modules": 1}), seed=5)
    prefix = f"model.layers.{CONFIG.num_layers}."
    extra = {}
    for name, tensor in iter_hf_weights(mtp_model):
        if name.startswith(prefix):
            copy_of = {"embed_tokens.weight": "model.embed_tokens.weight",
                       "shared_head.head.weight": "lm_head.weight"}.get(name[len(prefix):])
            extra[name] = main[copy_of] if copy_of else tensor.bfloat16().contiguous()
    save_file(extra, path / "model-mtp.safetensors", metadata={"format": "pt"})
    _rewrite_index(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return path


@pytest.fixture(scope="module")
def dist_bf16(tmp_path_factory, hf_bf16) -> Path:
    out = tmp_path_factory.mktemp("dist") / "bf16"
    hf_to_dist(hf_bf16, out, max_file_bytes=2**20)
    return out


# ------------------------------------------------------------------------------ round trips
def test_bf16_round_trip_is_exact_and_transformers_loads_it(hf_bf16, dist_bf16, reference, tmp_path):
    reader = DistReader(dist_bf16)
    assert len({info.relative_path for info in reader.metadata.storage_data.values()}) > 1  # several files
    assert reader.common["step"] == 0 and reader.common["model_config"] == DSV3Config.from_hf(CONFIG.to_hf()).to_dict()
    # per-expert tensors became chunks of the fused expert tensor
    key = "model.layers.1.mlp.experts.gate_up_weight"
    assert len(reader.tensors[key].chunks) == 2 * CONFIG.num_routed_experts
    source = _tensors(hf_bf16)
    gate_3 = reader.read(key, [3, 0, 0], [1, CONFIG.moe_ffn_hidden_size, CONFIG.hidden_size])[0]
    assert torch.equal(gate_3, source["model.layers.1.mlp.experts.3.gate_proj.weight"].float())

    dist_to_hf(dist_bf16, tmp_path / "back", max_shard_bytes=400_000)
    back = _tensors(tmp_path / "back")
    assert len(list((tmp_path / "back").glob("*.safetensors"))) > 1
    assert set(back) == set(source)
    for name, tensor in source.items():  # the routing bias in FP32, bitwise
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert source["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32

    exported = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    x = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = exported(x).logits, reference(x).logits
    assert a.std() > 0.1 and torch.equal(a, b)


def test_fp8_round_trip_within_quantisation_error(hf_fp8, tmp_path):
    source = _tensors(hf_fp8)
    scaled = [n for n in source if n.endswith("_scale_inv")]
    assert scaled and any(source[n].shape[-2] * 128 > source[n[:-len("_scale_inv")]].shape[-2] for n in scaled)
    hf_to_dist(hf_fp8, tmp_path / "dist")
    reader = DistReader(tmp_path / "dist")
    dense = dequantize_fp8_blockwise(source["model.layers.0.mlp.gate_proj.weight"],
                                     source["model.layers.0.mlp.gate_proj.weight_scale_inv"])
    assert torch.equal(reader.read("model.layers.0.mlp.gate_proj.weight"), dense)  # padded 320-row grid

    dist_to_hf(tmp_path / "dist", tmp_path / "back", fp8=True)
    back = _tensors(tmp_path / "back")
    assert set(back) == set(source)
    for name in scaled:
        weight = name[:-len("_scale_inv")]
        assert back[weight].dtype == torch.float8_e4m3fn, weight
        deq_back = dequantize_fp8_blockwise(back[weight], back[name])
        deq_source = dequantize_fp8_blockwise(source[weight], source[name])
        # within one FP8 step (e4m3 codes near 448 are 32 apart) of each block's scale; in fact each
        # block's amax lands on 448 again, so codes and scales come back identical
        step = 32 * expand_block_scales(source[name], *deq_source.shape[-2:])
        assert ((deq_back - deq_source).abs() <= step).all(), weight
        assert torch.equal(back[weight].view(torch.uint8), source[weight].view(torch.uint8)), weight
    assert json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]["weight_block_size"] \
        == [128, 128]
    bias = "model.layers.2.mlp.gate.e_score_correction_bias"
    assert back[bias].dtype == source[bias].dtype == torch.float32 and torch.equal(back[bias], source[bias])

    # transformers dequantises FP8 checkpoints to BF16 on a CPU: the export and the source give the
    # same logits; against the FP32 dequantised weights they differ by BF16 rounding only.
    def logits(path, **kwargs):
        with fp8_partial_blocks():  # transformers refuses partial edge blocks (compat/transformers_fp8.py)
            model = DeepseekV3ForCausalLM.from_pretrained(path, attn_implementation="eager", **kwargs).eval()
        x = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return model(x).logits.float()

    exported, original = logits(tmp_path / "back"), logits(hf_fp8)
    assert torch.equal(exported, original)
    dist_to_hf(tmp_path / "dist", tmp_path / "fp32", dtype=torch.float32)
    full = logits(tmp_path / "fp32", dtype=torch.float32)
    assert (exported - full).abs().max() < 0.05 * full.abs().max()  # BF16 weights and activations


def test_mtp_tensors_map_to_our_mtp_module_and_back(hf_mtp, tmp_path):
    source = _tensors(hf_mtp)
    done = hf_to_dist(hf_mtp, tmp_path / "dist")
    assert done.config.mtp_num_modules == 1 and len(done.mtp_copies_checked) == 2
    reader = DistReader(tmp_path / "dist")
    n = CONFIG.num_layers
    assert torch.equal(reader.read("model.mtp.0.eh_proj.weight"), source[f"model.layers.{n}.eh_proj.weight"].float())
    assert torch.equal(reader.read("model.mtp.0.norm.weight"),
                       source[f"model.layers.{n}.shared_head.norm.weight"].float())
    assert torch.equal(reader.read("model.mtp.0.layer.self_attn.kv_b_proj.weight"),
                       source[f"model.layers.{n}.self_attn.kv_b_proj.weight"].float())
    dist_to_hf(tmp_path / "dist", tmp_path / "back")
    back = _tensors(tmp_path / "back")
    assert set(back) == set(source)
    assert all(torch.equal(back[k], source[k]) for k in source)


# ------------------------------------------------------------------------------ refusals
def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    for shard in sorted(dst.glob("*.safetensors")):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    _rewrite_index(dst)
    return dst


def _convert(*argv: str, capsys) -> tuple[int, str]:
    from megatron_dsv3.cli.convert import main

    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshaped", "scale_grid", "layout"])
def test_refusals_name_the_tensor(case, hf_bf16, hf_fp8, tmp_path, capsys):
    name = "model.layers.1.self_attn.q_b_proj.weight"

    def edit(tensors):
        if case == "missing":
            tensors.pop(name, None)
        elif case == "unexpected" and name in tensors:
            tensors["model.layers.1.self_attn.extra.weight"] = tensors[name].clone()
        elif case == "misshaped" and name in tensors:
            tensors[name] = tensors[name][:-1].clone()
        elif case == "scale_grid" and name in tensors:
            tensors[name + "_scale_inv"] = torch.ones(2, 2)

    expected = {"missing": name, "unexpected": "model.layers.1.self_attn.extra.weight", "misshaped": name,
                "scale_grid": name + "_scale_inv", "layout": "num_routed_experts"}[case]
    extra = ["--expert", "3"] if case == "layout" else []
    source = hf_bf16 if case == "layout" else _edited(hf_fp8 if case == "scale_grid" else hf_bf16,
                                                        tmp_path / "src", edit)
    code, err = _convert("hf-to-dist", str(source), str(tmp_path / "out"), *extra, capsys=capsys)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_layout_is_checked_not_baked_in(hf_bf16, tmp_path, capsys):
    code, _ = _convert("hf-to-dist", str(hf_bf16), str(tmp_path / "a"), "--tensor", "2", "--expert", "4",
                       "--pipeline", "3", capsys=capsys)
    assert code == 0
    code, _ = _convert("hf-to-dist", str(hf_bf16), str(tmp_path / "b"), capsys=capsys)
    assert code == 0
    a, b = DistReader(tmp_path / "a"), DistReader(tmp_path / "b")  # the same whatever layout was checked
    assert a.metadata.state_dict_metadata == b.metadata.state_dict_metadata
    assert (tmp_path / "a" / "__0_0.distcp").read_bytes() == (tmp_path / "b" / "__0_0.distcp").read_bytes()


# ------------------------------------------------------------------------------ dsv3-train starts from it
SMALL = ["model.preset=tiny", "model.overrides.seq_aux_loss_coeff=0.0", "model.overrides.mtp_num_modules=0",
         "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=2",
         "train.warmup_steps=1", "logging.interval=1", "logging.jsonl=true", "logging.wandb=false",
         "checkpoint.save_interval=0", "parallel.timeout_s=60"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from megatron_dsv3.data.indexed import write_indexed

    prefix = str(tmp_path_factory.mktemp("data") / "text")
    write_indexed(["def convert(weights):\n    return {k: v for k, v in weights.items()}\n" * 30] * 6, prefix)
    return prefix


def _first_batch_loss(reference, dataset: str, cache: Path) -> float:
    """transformers' mean LM loss over the first global batch dsv3-train draws (one data-parallel rank)."""
    from megatron_dsv3.data import build_train_iterator
    from megatron_dsv3.run_config import load_run_config

    run = load_run_config(None, (*SMALL, f"data.paths=[{dataset}]", f"data.cache_dir={cache}"))
    batches = build_train_iterator(run.data, 32, 2, 4, 0, 1, run.train.seed, CONFIG.vocab_size)
    losses = []
    with torch.no_grad():
        for _ in range(2):
            batch = next(batches)
            logits = reference(batch["tokens"]).logits
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))
    return torch.stack(losses).mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.tensor=2", "parallel.expert=2"],
                                    ["parallel.pipeline=2"]], ids=["tp2xep2", "pp2"])
def test_dsv3_train_starts_from_the_converted_weights(layout, hf_bf16, dist_bf16, reference, dataset, tmp_path):
    run_dir = tmp_path / "run"
    argv = [*SMALL, *layout, f"data.paths=[{dataset}]", f"data.cache_dir={tmp_path / 'cache'}",
            f"checkpoint.dir={run_dir / 'ckpt'}", f"checkpoint.load_weights={dist_bf16}", "checkpoint.save_interval=2"]
    outputs = run_ranks(2, ["-m", "megatron_dsv3.train", *argv], timeout=240)
    assert "started from the weights of" in outputs[0], outputs[0][-2000:]
    records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert records[0]["step"] == 1 and len(records) == 2
    expected = _first_batch_loss(reference, dataset, tmp_path / "cache")
    assert abs(records[0]["loss"] - expected) < 1e-4 * expected, (records[0]["loss"], expected)

    # The run's own final save (chunks split over its ranks) goes back to Hugging Face too.
    saved = run_dir / "ckpt" / "iter_0000002"
    dist_to_hf(saved, tmp_path / "export")
    exported = _tensors(tmp_path / "export")
    assert set(exported) == set(read_headers(hf_bf16))
    trained = DistReader(saved).read("model.layers.2.mlp.experts.gate_up_weight")
    assert torch.equal(exported["model.layers.2.mlp.experts.5.up_proj.weight"],
                       trained[5, CONFIG.moe_ffn_hidden_size:].bfloat16())


def test_load_weights_refuses_a_model_it_does_not_fit(dist_bf16, dataset, tmp_path, capsys):
    from megatron_dsv3.train import main

    code = main([*SMALL, "model.overrides.mtp_num_modules=1", f"data.paths=[{dataset}]",
                 f"data.cache_dir={tmp_path / 'cache'}", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 f"checkpoint.load_weights={dist_bf16}", "train.steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "model.mtp.0.eh_proj.weight" in err and "mtp_num_modules: 0 there, 1 here" in err, err
