"""MDS shards: write/read round trip, image framing, errors, several processes reading at once."""

from __future__ import annotations

import os
import re

import pytest
from forked import forked_map
from mmpretrain.data.shards import ShardReader, pack_images, unpack_images, write_shards


def _samples(n: int) -> list[dict]:
    """Samples with 0..3 images of varied byte content, unicode text and images between texts."""
    out = []
    for i in range(n):
        images = [bytes([i % 256, k]) * (50 * i + k) for k in range(i % 4)]
        segments = [{"text": f"sample {i} — ünïcode"}]
        for k in range(len(images)):
            segments += [{"image": k}, {"text": f"image {k}"}]
        out.append({"id": f"s{i}", "kind": ["caption", "qa", "interleaved"][i % 3],
                    "segments": segments, "images": images})
    return out


def test_image_framing():
    for blobs in ([], [b""], [b"abc"], [b"\x00" * 7, b"", b"xyz" * 100]):
        assert unpack_images(pack_images(blobs)) == blobs
    with pytest.raises(ValueError, match="trailing"):
        unpack_images(pack_images([b"ab"]) + b"!")


def test_roundtrip_across_shards(tmp_path):
    samples = _samples(40)
    assert write_shards(tmp_path / "ds", samples, size_limit=4096) == 40
    assert len(list((tmp_path / "ds").glob("shard.*.mds"))) > 1
    reader = ShardReader(tmp_path / "ds")
    assert len(reader) == 40
    assert [reader[i] for i in range(40)] == samples
    assert list(reader) == samples
    assert reader[-1] == samples[-1]
    assert reader[0]["images"] == [] and len(reader[3]["images"]) == 3


def test_index_errors(tmp_path):
    write_shards(tmp_path, _samples(3))
    reader = ShardReader(tmp_path)
    with pytest.raises(IndexError):
        reader[3]
    with pytest.raises(IndexError):
        reader[-4]


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothing"))):
        ShardReader(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MDS index"):
        ShardReader(tmp_path / "empty")


def test_bad_samples_are_rejected(tmp_path):
    bad = {"id": "x", "kind": "caption", "segments": [{"image": 1}], "images": [b"1"]}
    with pytest.raises(ValueError, match="bad segment"):
        write_shards(tmp_path / "a", [bad])
    with pytest.raises(ValueError, match="missing keys"):
        write_shards(tmp_path / "b", [{"id": "x"}])


@pytest.mark.parametrize("segments, error", [
    ([{"imahe": 0}], "bad segment"), ([{"image": 3}], "bad segment"), ([{"text": 5}], "bad segment"),
    ({"text": "x"}, "segments must be a list"), (["text"], "bad segment")])
def test_a_row_of_another_writer_that_breaks_the_format_is_a_shard_error(tmp_path, segments, error):
    """Shards written by another tool (or damaged) may hold rows our writer refuses: reading one
    is the loader's counted skip (ShardError corrupt_sample) naming the row, not a crash."""
    from mmpretrain.data.shards import COLUMNS, ShardError
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path), columns=COLUMNS) as writer:
        for i in range(2):
            writer.write({"id": f"s{i}", "kind": "caption", "images": pack_images([b"1"]),
                          "segments": segments if i else [{"image": 0}, {"text": "ok"}]})
    reader = ShardReader(tmp_path)
    assert reader[0]["segments"] == [{"image": 0}, {"text": "ok"}]
    with pytest.raises(ShardError, match=rf"row 1: sample 's1': {error}") as caught:
        reader[1]
    assert caught.value.reason == "corrupt_sample"


def test_damaged_row_offsets_are_shard_errors(tmp_path):
    """A shard whose row-offset table is damaged (its size unchanged, so it opens): each row that
    cannot be read is a ShardError (the loader's counted skip), never another exception."""
    import random
    import struct

    from mmpretrain.data.shards import ShardError

    samples = _samples(12)
    write_shards(tmp_path / "ds", samples)
    shard = next((tmp_path / "ds").glob("shard.*.mds"))
    good = shard.read_bytes()
    data = bytearray(good)  # MDS: sample count, then the rows' begin offsets (uint32 each)
    begin, end = struct.unpack_from("<II", data, 4 * (1 + 5))
    struct.pack_into("<I", data, 4 * (1 + 5), end)  # row 5 begins where it ends
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"row 5: ") as caught:
        ShardReader(tmp_path / "ds")[5]
    assert caught.value.reason == "corrupt_sample"

    rng, failed = random.Random(0), 0
    for _ in range(20):  # random bytes in the offset table and the first rows
        data = bytearray(good)
        for _ in range(8):
            data[rng.randrange(4 * (len(samples) + 2))] = rng.randrange(256)
        shard.write_bytes(bytes(data))
        reader = ShardReader(tmp_path / "ds")
        for i in range(len(samples)):
            try:
                reader[i]
            except ShardError:
                failed += 1
    assert failed > 0  # the damage was seen, and only as ShardErrors


def test_failed_write_leaves_no_index(tmp_path):
    def broken():
        yield from _samples(5)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_shards(tmp_path / "ds", broken(), size_limit=2048)
    assert not (tmp_path / "ds" / "index.json").exists()
    with pytest.raises(FileNotFoundError):
        ShardReader(tmp_path / "ds")


def _read_all(path: str) -> list[str]:
    reader = ShardReader(path)
    return [reader[i]["id"] for i in range(len(reader))]


def test_several_processes_read_at_once(tmp_path):
    write_shards(tmp_path / "ds", _samples(30), size_limit=4096)
    before = set(os.listdir(tmp_path))
    results = forked_map(_read_all, [str(tmp_path / "ds")] * 4, processes=2)
    assert all(r == [f"s{i}" for i in range(30)] for r in results)
    assert set(os.listdir(tmp_path)) == before
    assert "index.json" in os.listdir(tmp_path / "ds")
    assert not [n for n in os.listdir(tmp_path / "ds") if n.endswith((".lock", ".tmp"))]
