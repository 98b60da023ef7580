"""dsv3-prepare: text files or .jsonl into Megatron's indexed dataset (.bin + .idx).

    dsv3-prepare --input docs/ more.jsonl --output-prefix data/mix --tokenizer byte

A text file is one document; a .jsonl line is one document (its `--json-key` field). Bounds:
a document of at most 1 GiB (`data.indexed.MAX_DOCUMENT_BYTES`), at most a million input files.
Exit codes: 0 done, 2 an unusable input or output (one line), 1 a bug.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_dsv3.cli.guard import entry_point


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


def output_prefix_problem(prefix: str) -> Optional[str]:
    """Why PREFIX.bin and PREFIX.idx cannot be written, or None if they can be tried."""
    path = os.path.expanduser(prefix)
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if not path or path.endswith(separators) or os.path.isdir(path):
        example = os.path.join(path.rstrip("".join(separators)) or ".", "name")
        what = ("is an existing directory" if path and not path.endswith(separators) else
                f"names no file, so it would write the hidden files {path}.bin and {path}.idx")
        return f"--output-prefix {prefix!r} {what}; give a prefix of files, e.g. {example}"
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"cannot write {path}.bin/.idx: {ancestor} is a file, not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot write {path}.bin/.idx: directory {ancestor} is not writable"
    return None


@entry_point("dsv3-prepare")
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    problem = output_prefix_problem(args.output_prefix)
    if problem:
        print(f"dsv3-prepare: error: {problem}", file=sys.stderr)
        return 2
    # imported once the arguments are checked, so that a refused argument is answered before torch loads
    from megatron_dsv3.data.indexed import DataError, prepare
    from megatron_dsv3.data.tokenizer import TokenizerError

    try:
        stats = prepare(args.input, args.output_prefix, args.tokenizer, args.json_key,
                        args.append_eod)
    except (DataError, TokenizerError) as err:
        print(f"dsv3-prepare: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # inputs and tokenizer are read under DataError/TokenizerError
        culprit = err.filename2 or err.filename  # os.replace names its target second
        where = f" ({culprit})" if culprit else ""
        print(f"dsv3-prepare: error: cannot write {args.output_prefix}.bin/.idx: {err.strerror or err}{where}",
              file=sys.stderr)
        return 2
    print(f"wrote {stats.prefix}.bin/.idx: {stats.num_documents} documents, "
          f"{stats.num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
