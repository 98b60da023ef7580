"""Peak resident memory of dsv3-convert on a generated multi-shard DeepseekV3 checkpoint (~2 GB).

    .venv/bin/python scripts/bench_convert.py [--dir /tmp/bench_convert] [--gb 2] [--shards 2] [--fp8]

Writes random BF16 weights (or FP8 with weight_scale_inv for `--fp8`) for a DeepseekV3 shape in
`--shards` safetensors shards through an index, then runs `dsv3-convert hf-to-dist` and
`dist-to-hf` as child processes and reads each one's peak RSS (getrusage of the children, which
counts file pages the process maps as well as its heap). A child that only imports what the
converter imports is measured too: what conversion adds is the difference. Prints one Markdown
table row per command.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_dsv3.config import DSV3Config  # noqa: E402
from megatron_dsv3.convert.dist_to_hf import FP8_WEIGHTS  # noqa: E402
from megatron_dsv3.convert.hf_to_dist import meta_model  # noqa: E402
from megatron_dsv3.convert.safetensors_io import ShardWriter  # noqa: E402
from megatron_dsv3.fp8.quantize import quantize_blocks  # noqa: E402
from megatron_dsv3.convert.hf import iter_hf_weights  # noqa: E402


def config_for(gigabytes: float) -> DSV3Config:
    """A DeepSeek-V3 shape (MLA, 1 dense + MoE layers, 64 experts) scaled by its layer count."""
    base = dict(vocab_size=32000, hidden_size=2048, first_k_dense_layers=1, dense_ffn_hidden_size=5632,
                num_attention_heads=16, q_lora_rank=768, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                v_head_dim=64, num_routed_experts=64, num_shared_experts=1, num_experts_per_token=6,
                moe_ffn_hidden_size=640, num_expert_groups=8, num_limited_groups=4, mtp_num_modules=0,
                max_position_embeddings=4096)
    per_layer = 3 * 65 * 2048 * 640 * 2  # routed + shared experts, BF16 bytes
    layers = max(2, round(gigabytes * 2**30 / per_layer))
    return DSV3Config.preset("tiny", num_layers=layers, **base)


def generate(out: Path, config: DSV3Config, shards: int, fp8: bool) -> list[int]:
    """Write the checkpoint; returns the shard sizes in bytes."""
    out.mkdir(parents=True)
    names = [(name, tuple(t.shape)) for name, t in iter_hf_weights(meta_model(config))]
    entries = []
    for name, shape in names:
        if fp8 and FP8_WEIGHTS.match(name):
            grid = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
            entries.append([(name, torch.float8_e4m3fn, shape), (name + "_scale_inv", torch.float32, grid)])
        else:
            entries.append([(name, torch.bfloat16, shape)])
    total = sum(math.prod(s) * d.itemsize for group in entries for _, d, s in group)
    groups, size = [[]], 0
    for group in entries:
        nbytes = sum(math.prod(s) * d.itemsize for _, d, s in group)
        if groups[-1] and size + nbytes > total / shards and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(group)
        size += nbytes
    weight_map, g = {}, torch.Generator().manual_seed(0)
    for number, shard in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        writer = ShardWriter(out / file, [entry for group in shard for entry in group])
        for group in shard:
            weight = torch.randn(group[0][2], generator=g) * 0.02
            if len(group) == 2:
                for (name, _, _), tensor in zip(group, quantize_blocks(weight, name=group[0][0])):
                    writer.write(name, tensor)
            else:
                writer.write(group[0][0], weight.bfloat16())
            weight_map.update({name: file for name, _, _ in group})
        writer.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf_config = config.to_hf()
    if fp8:
        hf_config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    hf_config.save_pretrained(str(out))
    return [p.stat().st_size for p in sorted(out.glob("*.safetensors"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/bench_convert")
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--fp8", action="store_true")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    config = config_for(args.gb)
    sizes = generate(root / "hf", config, args.shards, args.fp8)
    largest = max(sizes) / 2**30
    print(f"checkpoint: {config.num_layers} layers, {len(sizes)} shards, {sum(sizes) / 2**30:.2f} GiB, "
          f"largest shard {largest:.2f} GiB ({'FP8' if args.fp8 else 'BF16'})")
    cli = ["-m", "megatron_dsv3.cli.convert"]
    # Each measurement in a fresh grandchild so ru_maxrss is that command's alone.
    runs = {
        "imports only": ["-c", "import megatron_dsv3.cli.convert, megatron_dsv3.convert"],
        "hf-to-dist": [*cli, "hf-to-dist", str(root / "hf"), str(root / "dist")],
        "dist-to-hf" + (" --fp8" if args.fp8 else ""): [*cli, "dist-to-hf", str(root / "dist"), str(root / "back"),
                                                        *(["--fp8"] if args.fp8 else [])],
    }
    print("| command | peak RSS GiB | x largest shard | seconds |")
    print("|---|---|---|---|")
    for label, argv in runs.items():
        wrapped = ["-c", "import resource, subprocess, sys; subprocess.run([sys.executable, *sys.argv[1:]], "
                         "check=True, stdout=subprocess.DEVNULL); "
                         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)", *argv]
        start = time.monotonic()
        out = subprocess.run([sys.executable, *wrapped], check=True, cwd=ROOT, capture_output=True, text=True)
        gib = int(out.stdout.strip().splitlines()[-1]) / 2**20
        print(f"| {label} | {gib:.2f} | {gib / largest:.2f} | {time.monotonic() - start:.0f} |", flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
