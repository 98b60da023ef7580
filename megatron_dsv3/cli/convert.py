"""dsv3-convert: bring your own weights into dsv3-train's checkpoints, and take them back out.

    dsv3-convert hf-to-dist HF_DIR OUT [--dtype fp32|bf16] [--tensor T --pipeline P --expert E]
    dsv3-convert dist-to-hf CKPT OUT [--fp8] [--dtype bf16|fp32] [--tokenizer PATH|byte]
    dsv3-convert mcore-to-dist NATIVE_CKPT OUT --model-config config.json [--dtype fp32|bf16]
    dsv3-convert dist-to-mcore CKPT OUT [--te] [--dtype fp32|bf16]
    ... [--replace]        # OUT may hold files: they are removed once the new output is complete

hf-to-dist reads a Hugging Face DeepseekV3 folder (config.json, safetensors shards, BF16 or FP8
with weight_scale_inv) one tensor at a time and writes a layout-free distributed checkpoint;
start training from it with `checkpoint.load_weights=OUT` (weights only: a fresh optimizer and
step 0). --tensor/--pipeline/--expert only check that the model splits that way. dist-to-hf
writes shards, their index and config.json that transformers' from_pretrained loads (DeepSeek-V3's
release fields; the routing bias in FP32), the run's tokenizer files (or a note, for the byte
tokenizer) and a README.md.
mcore-to-dist / dist-to-mcore convert distributed checkpoints of a GPTModel built from
Megatron-Core's own MLA + MoE specs (local or Transformer Engine names) to ours and back.

Every direction reads its checkpoint as data (checked items, checksums against its manifest)
and writes OUT through `OUT.tmp` (convert/output.py): an OUT that holds files is refused unless
--replace, and a failed conversion leaves OUT as it was.
Exit codes: 0 done, 2 refused input (named in one line), 5 the output could not be written (disk
full, an I/O error: the partial folder removed), 1 a bug (its traceback, then a line saying so).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

from megatron_dsv3 import exit_status
from megatron_dsv3.cli.guard import entry_point

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3-convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_dist = sub.add_parser("hf-to-dist", help="Hugging Face safetensors -> distributed checkpoint")
    to_dist.add_argument("hf_dir")
    to_dist.add_argument("out", help="the checkpoint folder to create (must not exist)")
    to_dist.add_argument("--dtype", choices=DTYPES, default="fp32",
                         help="stored weights (default fp32, what dsv3-train's checkpoints hold)")
    for dim in ("tensor", "pipeline", "expert"):
        to_dist.add_argument(f"--{dim}", type=int, default=1, metavar="N",
                             help=f"check that the model splits over {dim}-parallel size N (nothing is baked in)")
    to_hf = sub.add_parser("dist-to-hf", help="distributed checkpoint -> Hugging Face safetensors")
    to_hf.add_argument("checkpoint", help="a checkpoint folder (iter_NNNNNNN or hf-to-dist's OUT)")
    to_hf.add_argument("out")
    to_hf.add_argument("--fp8", action="store_true", help="projection weights as FP8 with 128x128 weight_scale_inv")
    to_hf.add_argument("--dtype", choices=DTYPES, default="bf16",
                       help="the other tensors' dtype (default bf16; the routing bias is always fp32)")
    to_hf.add_argument("--tokenizer", metavar="PATH|byte",
                       help="the run's tokenizer (default: data.tokenizer of the run_config.yaml beside the checkpoint)")
    for parser_ in (to_dist, to_hf):
        parser_.add_argument("--max-file-gb", type=float, default=4.0, help="size of each output file (default 4)")
    from_mcore = sub.add_parser("mcore-to-dist", help="native Megatron-Core checkpoint -> ours")
    from_mcore.add_argument("native")
    from_mcore.add_argument("out")
    from_mcore.add_argument("--model-config", required=True,
                            help="an HF config.json or a JSON of DSV3Config fields (the native checkpoint has none)")
    to_mcore = sub.add_parser("dist-to-mcore", help="ours -> native Megatron-Core checkpoint")
    to_mcore.add_argument("checkpoint")
    to_mcore.add_argument("out")
    to_mcore.add_argument("--te", action="store_true", help="the Transformer Engine spec's fused norm names")
    for parser_ in (from_mcore, to_mcore):
        parser_.add_argument("--dtype", choices=DTYPES, default="fp32", help="stored weights (default fp32)")
    for parser_ in (to_dist, to_hf, from_mcore, to_mcore):
        parser_.add_argument("--replace", action="store_true",
                             help="OUT may hold files: replace them (removed once the new output is complete)")
    return parser


MAX_PARALLEL = 2**16  # --tensor/--pipeline/--expert
MAX_FILE_GB = 1024.0


@entry_point("dsv3-convert")
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    gb = getattr(args, "max_file_gb", 4.0)
    if not (math.isfinite(gb) and 2**-20 <= gb <= MAX_FILE_GB):
        parser.error(f"--max-file-gb must be a number in [1 KiB = {2**-20:.1e}, {MAX_FILE_GB:g}], got {gb}")
    if any(not 1 <= getattr(args, dim, 1) <= MAX_PARALLEL for dim in ("tensor", "pipeline", "expert")):
        parser.error(f"--tensor, --pipeline and --expert must be in [1, {MAX_PARALLEL}]")
    # imported once the arguments are checked, so that a refused argument is answered before torch loads
    import pickle

    import torch

    from megatron_dsv3.config import ConfigError
    from megatron_dsv3.convert import dist_to_hf, hf_to_dist
    from megatron_dsv3.convert.distcp import DistCheckpointError
    from megatron_dsv3.convert.mcore_names import NativeNameError
    from megatron_dsv3.convert.output import OutputWriteError
    from megatron_dsv3.convert.safetensors_io import SafetensorsError
    from megatron_dsv3.convert.hf import HFWeightError
    from megatron_dsv3.data.tokenizer import TokenizerError

    log = lambda message: print(f"dsv3-convert: {message}", flush=True)  # noqa: E731
    dtype = getattr(torch, DTYPES[args.dtype])
    max_bytes = int(gb * 2**30)
    try:
        if args.command == "hf-to-dist":
            done = hf_to_dist(args.hf_dir, args.out, dtype,
                              {"tensor": args.tensor, "pipeline": args.pipeline, "expert": args.expert}, max_bytes, log,
                              replace=args.replace)
            log(f"wrote {done.path}: {done.tensors} tensors, {len(done.dequantized)} dequantised from FP8, "
                f"{len(done.mtp_copies_checked)} MTP copies checked; train from it with "
                f"checkpoint.load_weights={done.path}")
        elif args.command == "dist-to-hf":
            files = dist_to_hf(args.checkpoint, args.out, args.fp8, dtype, max_bytes, log, replace=args.replace,
                               tokenizer=args.tokenizer)
            log(f"wrote {len(files)} shards, model.safetensors.index.json, config.json and README.md into {args.out}")
        elif args.command == "mcore-to-dist":
            from megatron_dsv3.convert.mcore import mcore_to_dist, read_model_config  # Megatron-Core only when asked

            path = mcore_to_dist(args.native, args.out, read_model_config(args.model_config), dtype, log,
                                 replace=args.replace)
            log(f"wrote {path}; train from it with checkpoint.load_weights={path}")
        else:
            from megatron_dsv3.convert.mcore import dist_to_mcore  # Megatron-Core only when asked

            log(f"wrote {dist_to_mcore(args.checkpoint, args.out, args.te, dtype, log, replace=args.replace)}")
    except OutputWriteError as error:
        print(f"dsv3-convert: error: {error}", file=sys.stderr)
        return exit_status.WRITE_FAILED
    except (ConfigError, HFWeightError, DistCheckpointError, SafetensorsError, NativeNameError, TokenizerError,
            FileNotFoundError, FileExistsError, pickle.UnpicklingError) as error:
        print(f"dsv3-convert: error: {error}", file=sys.stderr)
        return exit_status.REFUSED
    except OSError as error:  # reading an input: a folder where a file belongs, no permission, an I/O error
        print(f"dsv3-convert: error: cannot read {error.filename or 'the input'}: {error.strerror or error}",
              file=sys.stderr)
        return exit_status.REFUSED
    return exit_status.DONE


if __name__ == "__main__":
    sys.exit(main())
