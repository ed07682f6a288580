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
A remote dataset is read through the same class over a local cache (`remote.py`).
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
    sid, images, segments = sample["id"], sample["images"], sample["segments"]
    if not isinstance(images, list) or not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise ValueError(f"sample {sid!r}: images must be a list of bytes")
    if not isinstance(segments, list):
        raise ValueError(f"sample {sid!r}: segments must be a list, not {type(segments).__name__}")
    for seg in segments:
        if isinstance(seg, dict) and set(seg) == {"text"} and isinstance(seg["text"], str):
            continue
        if isinstance(seg, dict) and set(seg) == {"image"} and isinstance(seg["image"], int) \
                and 0 <= seg["image"] < len(images):
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
    """The sample of an MDS row (ValueError if it does not follow the sample format: a shard
    written by another tool, or damaged)."""
    sample = {
        "id": row["id"],
        "kind": row["kind"],
        "segments": row["segments"],
        "images": unpack_images(row["images"]),
    }
    validate_sample(sample)
    return sample


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


class ShardError(ValueError):
    """A sample whose stored bytes cannot be read; `reason` is a short metric name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _read_index(path: Path) -> dict:
    """The parsed index.json of `path`; a clear error naming the file when it is unusable."""
    index_file = path / get_index_basename()
    if not index_file.is_file():
        raise FileNotFoundError(f"{path}: no MDS index ({index_file} not found); not a shard directory")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index_file}: unreadable MDS index: {e}") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ValueError(f"{index_file}: not an MDS index (no 'shards' list)")
    return index


def _check_shard_file(path: Path, obj: dict) -> None:
    """A clear error naming the shard file when it is missing, unreadable or of the wrong size."""
    shard = path / obj["raw_data"]["basename"]
    if not shard.is_file():
        raise FileNotFoundError(f"{shard}: shard file listed in {path / get_index_basename()} is missing")
    if not os.access(shard, os.R_OK):
        raise PermissionError(f"{shard}: shard file is not readable")
    want, got = obj["raw_data"].get("bytes"), shard.stat().st_size
    if want is not None and want != got:
        raise ValueError(f"{shard}: shard file has {got} bytes, the index says {want} (truncated?)")


def _load_index(path: Path, check_files: bool = True) -> list[MDSReader]:
    """Per-shard readers of the MDS index in `path`."""
    readers = []
    for obj in _read_index(path)["shards"]:
        if obj.get("format") != "mds":
            raise ValueError(f"{path}: shard format {obj.get('format')!r} is not mds")
        if obj.get("compression"):
            raise ValueError(f"{path}: compressed shards are not supported by ShardReader")
        if check_files:
            _check_shard_file(path, obj)
        reader = reader_from_json(str(path), None, obj)
        reader.validate(allow_unsafe_types=False)  # refuses pickle columns
        readers.append(reader)
    return readers


class ShardReader:
    """Random access to the samples of a local MDS directory written by `write_shards`.

    Every shard file is checked at open (present, readable, of the indexed size). With `fetch`
    (see `remote.py`) shards are instead fetched on first use into `path`, a local cache."""

    def __init__(self, path: str | Path, fetch=None) -> None:
        self.path = Path(path)
        self.fetch = fetch  # callable(basename) that makes path/basename present, or None
        self.shards = _load_index(self.path, check_files=fetch is None)
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

    def _where(self, index: int) -> tuple[int, int]:
        """(shard number, row within it) of sample `index`."""
        i = index + self._len if index < 0 else index
        if not 0 <= i < self._len:
            raise IndexError(f"sample {index} out of range for {self._len} samples in {self.path}")
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def locate(self, index: int) -> tuple[str, int]:
        """(shard file name, row within it) of sample `index`."""
        k, row = self._where(index)
        return self.shards[k].raw_data.basename, row

    def __getitem__(self, index: int) -> dict[str, Any]:
        k, row = self._where(index)
        name = self.shards[k].raw_data.basename
        if self.fetch is not None:
            self.fetch(name)
        try:
            return from_row(self.shards[k].get_item(row))
        except UnicodeDecodeError as e:
            raise ShardError("bad_text", f"{self.path / name} row {row}: text is not UTF-8: {e}") from None
        except (ValueError, IndexError, OverflowError, struct.error) as e:
            # damaged offsets make streaming's reader raise IndexError ("not present in the shard")
            raise ShardError("corrupt_sample", f"{self.path / name} row {row}: {e}") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self._len):
            yield self[i]

    def __repr__(self) -> str:
        return f"ShardReader({os.fspath(self.path)!r}, samples={self._len}, shards={len(self.shards)})"
