"""dsv3-prepare: text files or .jsonl into Megatron's indexed dataset (.bin + .idx).

    dsv3-prepare --input docs/ more.jsonl --output-prefix data/mix --tokenizer byte

A text file is one document; a .jsonl line is one document (its `--json-key` field).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3-prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                        help="text files, .jsonl files or directories of them")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a path to tokenizer.json")
    parser.add_argument("--json-key", default="text", help="document field of .jsonl lines")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="close each document with the end-of-document token (default on)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_dsv3.data.indexed import DataError, prepare
    from megatron_dsv3.data.tokenizer import TokenizerError

    try:
        stats = prepare(args.input, args.output_prefix, args.tokenizer, args.json_key,
                        args.append_eod)
    except (DataError, TokenizerError) as err:
        print(f"dsv3-prepare: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {stats.prefix}.bin/.idx: {stats.num_documents} documents, "
          f"{stats.num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
