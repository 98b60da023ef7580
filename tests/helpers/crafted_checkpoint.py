"""A checkpoint crafted to run a command when loaded: what the checkpoint-safety tests feed to
every loader (dsv3-train's resume and load_weights, dsv3-convert, Megatron-Core's own reader)."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from megatron_dsv3.checkpoint import metadata_guard


def crafted_copy(source: Path, target: Path, marker: Path, key: str = "model.embed_tokens.weight") -> Path:
    """A copy of checkpoint `source` whose `.metadata` uses only allow-listed classes but declares
    `key` as a byte item (with the tensor's `size` attribute, which Megatron-Core's shape check
    reads) stored in a pickle appended to a shard: unpickling it touches `marker`."""
    class RunsACommand:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    shutil.copytree(source, target)
    meta = metadata_guard.read_metadata(target)
    payload = pickle.dumps(RunsACommand())
    shard = sorted(target.glob("*.distcp"))[0]
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    declared = BytesStorageMetadata()
    declared.size = meta.state_dict_metadata[key].size  # passes Megatron-Core's shape check on the way
    meta.state_dict_metadata[key] = declared
    meta.storage_data = {i: v for i, v in meta.storage_data.items() if i.fqn != key}
    meta.storage_data[MetadataIndex(key)] = _StorageInfo(shard.name, offset, len(payload))
    (target / ".metadata").write_bytes(pickle.dumps(meta))
    (target / "manifest.json").unlink()  # as a sharer of checkpoints would: no checksum to trip over
    return target
