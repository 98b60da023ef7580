"""Reading wandb's transaction log (``run-ID.wandb``), the file ``wandb sync`` uploads.

The file is a 7-byte header (``:W&B``, magic, version), then protobuf ``Record``s framed as in
LevelDB's log: 32 KiB blocks of chunks, each ``crc32c (4) | length (2) | type (1) | payload``,
a record split over blocks as FIRST, MIDDLE..., LAST chunks. wandb's service process writes
it; ``run.finish()`` returns before the service has flushed it, so a reader in the same
process waits for the run's exit record (``wait_for_exit_record``).
"""
from __future__ import annotations

import os
import struct
import time

HEADER_MAGIC = b":W&B"
HEADER_BYTES = 7
BLOCK_BYTES = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc32c, payload length, chunk type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
WRITE_TIMEOUT_S = 60.0
POLL_S = 0.05


def read_records(path: str | os.PathLike, first_block: int = 0) -> list:
    """The ``wandb_internal_pb2.Record``s of a ``.wandb`` file, read from block ``first_block``.

    A record begun before that block is skipped; a chunk still being written ends the list.
    Checksums are not verified (crc32c is not in the standard library).
    """
    from wandb.proto import wandb_internal_pb2 as pb  # wandb's import is slow; only readers of its files pay it

    with open(path, "rb") as f:
        if f.read(len(HEADER_MAGIC)) != HEADER_MAGIC:
            raise ValueError(f"{os.fspath(path)} is not a wandb transaction log (no ':W&B' header)")
        f.seek(first_block * BLOCK_BYTES)
        data = f.read()
    pos = HEADER_BYTES if first_block == 0 else 0
    records, fragments = [], None  # fragments: payloads of the record being assembled
    while pos + CHUNK_HEADER.size <= len(data):
        room = BLOCK_BYTES - pos % BLOCK_BYTES
        if room < CHUNK_HEADER.size:  # the writer pads a block's last bytes with zeros
            pos += room
            continue
        _crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        payload = data[pos + CHUNK_HEADER.size:pos + CHUNK_HEADER.size + length]
        if len(payload) < length:
            break
        pos += CHUNK_HEADER.size + length
        if kind in (FULL, FIRST):
            fragments = [payload]
        elif fragments is not None:
            fragments.append(payload)
        if kind in (FULL, LAST) and fragments is not None:
            record = pb.Record()
            record.ParseFromString(b"".join(fragments))
            records.append(record)
            fragments = None
    return records


def has_exit_record(path: str | os.PathLike) -> bool:
    """True once the run's exit record, the last one wandb stores, is in the file.

    Reads only the last two blocks: the exit record is small, so it starts in one of them.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return False
    if size <= HEADER_BYTES:
        return False
    tail_block = max(0, (size - 1) // BLOCK_BYTES - 1)
    return any(r.WhichOneof("record_type") == "exit" for r in read_records(path, tail_block))


def wait_for_exit_record(path: str | os.PathLike, timeout_s: float = WRITE_TIMEOUT_S) -> None:
    """Return once wandb has written the whole run to ``path``; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not has_exit_record(path):
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"wandb had not finished writing the offline run {os.fspath(path)} {timeout_s:g} s "
                "after run.finish() (its exit record is missing): `wandb sync` of it may lose data")
        time.sleep(POLL_S)
