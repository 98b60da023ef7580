"""The embedded default corpus: the Python standard library's own source files.

Every machine that runs Python has it, so `dsv3-train` needs no download. Files are taken in
sorted order (tests and site-packages left out) until a byte budget is reached; the prepared
dataset is cached and reused while its manifest matches.
"""
from __future__ import annotations

import json
import os
import sys
import sysconfig
from typing import Optional

from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

from megatron_dsv3.data.indexed import iter_documents, write_indexed
from megatron_dsv3.data.tokenizer import load_tokenizer

DEFAULT_CACHE_DIR = "~/.cache/megatron_dsv3"
DEFAULT_MAX_BYTES = 8_000_000
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MANIFEST_VERSION = 1


def stdlib_files(max_bytes: int = DEFAULT_MAX_BYTES, root: Optional[str] = None) -> list[str]:
    """Sorted stdlib *.py files whose sizes add up to at most `max_bytes`."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found.extend(os.path.join(dirpath, n) for n in names if n.endswith(".py"))
    found.sort(key=lambda p: os.path.relpath(p, root))
    files, total = [], 0
    for path in found:
        size = os.path.getsize(path)
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    return files


def _manifest_path(prefix: str) -> str:
    return prefix + ".manifest.json"


def _read_manifest(prefix: str) -> Optional[dict]:
    try:
        with open(_manifest_path(prefix)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_complete(prefix: str, manifest: Optional[dict], expected: dict) -> bool:
    if manifest is None or any(manifest.get(k) != v for k, v in expected.items()):
        return False
    sizes = {"bin_bytes": get_bin_path(prefix), "idx_bytes": get_idx_path(prefix)}
    return all(
        os.path.isfile(p) and os.path.getsize(p) == manifest.get(k)
        for k, p in sizes.items()
    )


def ensure_default_dataset(
    cache_dir: str = DEFAULT_CACHE_DIR, tokenizer="byte", max_bytes: int = DEFAULT_MAX_BYTES
) -> str:
    """Prepare the stdlib corpus once under `cache_dir` and return its path prefix.

    The manifest is written last, so a prepare that stopped half-way is redone, never used.
    """
    tokenizer = load_tokenizer(tokenizer)
    cache_dir = os.path.expanduser(cache_dir)
    prefix = os.path.join(cache_dir, "corpus", f"stdlib-{tokenizer.name}-{max_bytes}")
    files = stdlib_files(max_bytes)
    expected = {
        "version": _MANIFEST_VERSION,
        "python": sys.version.split()[0],
        "source": sysconfig.get_paths()["stdlib"],
        "num_files": len(files),
        "max_bytes": max_bytes,
        "tokenizer": tokenizer.name,
    }
    if _is_complete(prefix, _read_manifest(prefix), expected):
        return prefix
    if os.path.exists(_manifest_path(prefix)):
        os.remove(_manifest_path(prefix))
    stats = write_indexed(iter_documents(files), prefix, tokenizer, append_eod=True)
    manifest = dict(
        expected,
        num_documents=stats.num_documents,
        num_tokens=stats.num_tokens,
        bin_bytes=os.path.getsize(get_bin_path(prefix)),
        idx_bytes=os.path.getsize(get_idx_path(prefix)),
    )
    tmp = f"{_manifest_path(prefix)}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, _manifest_path(prefix))
    return prefix
