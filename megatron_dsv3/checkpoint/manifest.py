"""A checkpoint's files with their sizes and SHA-256 checksums: written at save, verified at load.

    manifest.json   {"format": 1, "algorithm": "sha256",
                     "files": {"__0_0.distcp": {"bytes": 8391, "sha256": "9f2c..."}, ".metadata": {...}, ...}}

It is written last into the `iter_NNNNNNN.tmp` folder, before the rename, and lists every other
file of the folder. A flipped byte in a shard, a zero-filled file of the right size or a file
added later is then named at load instead of loading silently (or diverging steps later).

The hashing is shared out: at save each rank hashes the files it wrote (Megatron-Core names them
`__<rank>_<n>.distcp`), at load the files are dealt round-robin over the ranks, so a rank hashes
about its part of one checkpoint, not the whole (cost: BENCHMARKS.md, "Checkpoint checksums"),
its files in parallel threads (`hashlib` releases the GIL while it hashes; Megatron-Core writes
two files per rank). The collective halves live in `checkpoint/dist.py`; this module is the file
format and the per-file work.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from megatron_dsv3 import safe_data

NAME = "manifest.json"
FORMAT = 1
ALGORITHM = "sha256"
MAX_BYTES = 16 * 2**20  # a manifest of a 671B checkpoint holds a few thousand files: ~1 MB
_CHUNK = 8 * 2**20
THREADS = 8  # files hashed at once by one rank
_WRITER = re.compile(r"^__(\d+)_\d+\.distcp$")


class ManifestError(ValueError):
    """A manifest that is not one, or a file that does not match it; the message names the file."""


def digest(path: str | Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of one file, read in 8 MiB pieces."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while piece := f.read(_CHUNK):
            sha.update(piece)
            size += len(piece)
    return size, sha.hexdigest()


def digests(folder: str | Path, names: list[str]) -> dict[str, tuple[int, str]]:
    """`digest` of each of `names` in `folder`, up to THREADS files at once."""
    with ThreadPoolExecutor(max_workers=max(1, min(THREADS, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda name: digest(Path(folder) / name), names)))


def hashed_at_save_by(name: str, index: int, world: int) -> int:
    """The rank that hashes file `name` (the `index`-th in sorted order) at save: its writer when the
    name says which rank wrote it, else round-robin."""
    match = _WRITER.match(name)
    if match and int(match.group(1)) < world:
        return int(match.group(1))
    return index % world


def files_to_list(folder: str | Path) -> list[str]:
    """The files a manifest of `folder` lists: every file in it but the manifest, sorted."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.name != NAME)


def write(folder: str | Path, entries: dict[str, tuple[int, str]]) -> None:
    """Write the manifest of `entries` ({name: (bytes, sha256)}) into `folder`, flushed to disk."""
    data = {"format": FORMAT, "algorithm": ALGORITHM,
            "files": {name: {"bytes": size, ALGORITHM: sha} for name, (size, sha) in sorted(entries.items())}}
    with open(Path(folder) / NAME, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read(folder: str | Path) -> Optional[dict[str, tuple[int, str]]]:
    """{name: (bytes, sha256)} of `folder`'s manifest; None when it has none (saved before checksums)."""
    path = Path(folder) / NAME
    if not path.exists():
        return None
    data = safe_data.read_json(path, NAME, MAX_BYTES, ManifestError)
    files = data.get("files")
    if data.get("format") != FORMAT or data.get("algorithm") != ALGORITHM or not isinstance(files, dict):
        raise ManifestError(f"{NAME} is not a format-{FORMAT} {ALGORITHM} manifest")
    entries = {}
    for name, entry in files.items():
        size, sha = (entry.get("bytes"), entry.get(ALGORITHM)) if isinstance(entry, dict) else (None, None)
        if (not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", "..") or isinstance(size, bool)
                or not isinstance(size, int) or size < 0 or not isinstance(sha, str)
                or not re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise ManifestError(f"{NAME} has a malformed entry for {name[:80]!r}")
        entries[name] = (size, sha)
    return entries


def check_sizes(folder: str | Path, entries: dict[str, tuple[int, str]]) -> Optional[str]:
    """What is wrong with `folder`'s files by name and size alone (cheap), or None."""
    folder = Path(folder)
    unlisted = [name for name in files_to_list(folder) if name not in entries]
    if unlisted:
        return f"{unlisted[0]} is not in {NAME} (added after the save?)"
    for name, (size, _) in sorted(entries.items()):
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {NAME} says {size}"
    return None


def verify(folder: str | Path, names: list[str], entries: dict[str, tuple[int, str]]) -> Optional[str]:
    """The first of `names` whose bytes do not match `entries`, as a sentence; None when all match."""
    try:
        found = digests(folder, names)
    except OSError as error:
        return f"{Path(error.filename or '?').name} cannot be read ({error.strerror or error})"
    bad = next((name for name in names if found[name] != entries[name]), None)
    return None if bad is None else f"{bad} does not match its checksum in {NAME} (damaged since the save)"
