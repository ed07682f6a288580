"""Reading and writing multimodal samples as MDS shards (mosaicml-streaming).

A sample is a dict:
    {"id": str, "kind": str,
     "segments": [{"text": str} | {"image": int}, ...],   # in reading order; image = index into images
     "images": [bytes, ...]}                               # encoded JPEG/PNG files

On disk each sample is one MDS row with columns id:str, kind:str, segments:json and images:bytes.
The images column frames the list of blobs without pickle:
    uint32 count | count x uint32 length | blob 0 | blob 1 | ...     (little-endian)

`ShardReader` reads a local MDS directory through streaming's per-shard `MDSReader`: plain file
reads, no shared memory, no cache directory, so any number of processes may open it at once.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from streaming import MDSWriter
from streaming.base.format import get_index_basename, reader_from_json
from streaming.base.format.mds import MDSReader

COLUMNS: dict[str, str] = {"id": "str", "kind": "str", "segments": "json", "images": "bytes"}
DEFAULT_SIZE_LIMIT = 1 << 26  # bytes per shard file (64 MiB); MDS offsets are uint32, so < 4 GiB

_U32 = struct.Struct("<I")


def pack_images(images: list[bytes]) -> bytes:
    """Frame a list of blobs as count, lengths, then the blobs."""
    head = struct.pack(f"<I{len(images)}I", len(images), *(len(b) for b in images))
    return head + b"".join(images)


def unpack_images(data: bytes) -> list[bytes]:
    """Inverse of `pack_images`."""
    (count,) = _U32.unpack_from(data, 0)
    sizes = struct.unpack_from(f"<{count}I", data, 4)
    pos = 4 + 4 * count
    blobs = []
    for size in sizes:
        blobs.append(bytes(data[pos : pos + size]))
        pos += size
    if pos != len(data):
        raise ValueError(f"image framing: {len(data) - pos} trailing bytes")
    return blobs


def validate_sample(sample: dict[str, Any]) -> None:
    """Raise ValueError if `sample` does not follow the sample format."""
    missing = {"id", "kind", "segments", "images"} - set(sample)
    if missing:
        raise ValueError(f"sample is missing keys {sorted(missing)}")
    sid, images = sample["id"], sample["images"]
    if not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise ValueError(f"sample {sid!r}: images must be bytes")
    for seg in sample["segments"]:
        if set(seg) == {"text"} and isinstance(seg["text"], str):
            continue
        if set(seg) == {"image"} and isinstance(seg["image"], int) and 0 <= seg["image"] < len(images):
            continue
        raise ValueError(f"sample {sid!r}: bad segment {seg!r} ({len(images)} images)")


def to_row(sample: dict[str, Any]) -> dict[str, Any]:
    """The MDS row of a sample."""
    validate_sample(sample)
    return {
        "id": str(sample["id"]),
        "kind": str(sample["kind"]),
        "segments": list(sample["segments"]),
        "images": pack_images([bytes(b) for b in sample["images"]]),
    }


def from_row(row: dict[str, Any]) -> dict[str, Any]:
    """The sample of an MDS row."""
    return {
        "id": row["id"],
        "kind": row["kind"],
        "segments": row["segments"],
        "images": unpack_images(row["images"]),
    }


def write_shards(
    out_dir: str | Path, samples: Iterable[dict[str, Any]], size_limit: int | str = DEFAULT_SIZE_LIMIT
) -> int:
    """Write `samples` as an MDS dataset into `out_dir` (absent or empty); return the count written."""
    count = 0
    writer = MDSWriter(out=str(out_dir), columns=COLUMNS, size_limit=size_limit)
    try:
        for sample in samples:
            writer.write(to_row(sample))
            count += 1
    except BaseException:
        # MDSWriter.__exit__ would write index.json even on error; a failed write leaves no index.
        writer.cancel_future_jobs()
        raise
    writer.finish()
    return count


def _load_index(path: Path) -> list[MDSReader]:
    """Per-shard readers of the MDS index in `path`."""
    index_file = path / get_index_basename()
    if not index_file.is_file():
        raise ValueError(f"{path}: no MDS index ({get_index_basename()}) found; not a shard directory")
    with open(index_file) as f:
        index = json.load(f)
    readers = []
    for obj in index.get("shards", []):
        if obj.get("format") != "mds":
            raise ValueError(f"{path}: shard format {obj.get('format')!r} is not mds")
        if obj.get("compression"):
            raise ValueError(f"{path}: compressed shards are not supported by ShardReader")
        reader = reader_from_json(str(path), None, obj)
        reader.validate(allow_unsafe_types=False)  # refuses pickle columns
        readers.append(reader)
    return readers


class ShardReader:
    """Random access to the samples of a local MDS directory written by `write_shards`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.shards = _load_index(self.path)
        self._starts: list[int] = []  # global index of each shard's first sample
        total = 0
        for shard in self.shards:
            self._starts.append(total)
            total += shard.samples
        self._len = total
        for shard in self.shards:
            missing = set(COLUMNS) - set(shard.column_names)
            if missing:
                raise ValueError(f"{self.path}: shard lacks columns {sorted(missing)}")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = index + self._len if index < 0 else index
        if not 0 <= i < self._len:
            raise IndexError(f"sample {index} out of range for {self._len} samples in {self.path}")
        k = bisect.bisect_right(self._starts, i) - 1
        return from_row(self.shards[k].get_item(i - self._starts[k]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self._len):
            yield self[i]

    def __repr__(self) -> str:
        return f"ShardReader({os.fspath(self.path)!r}, samples={self._len}, shards={len(self.shards)})"
