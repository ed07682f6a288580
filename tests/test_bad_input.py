"""Bad input at training time: each bad sample is skipped, counted as data/skipped_<reason>, logged
once with its shard and row; a missing or broken shard or index is an error at start naming it."""
from __future__ import annotations

import io
import itertools
import json
import logging

import numpy as np
import pytest
from mmpretrain.data.images import ImageSettings
from mmpretrain.data.loader import PackedLoader
from mmpretrain.data.shards import ShardReader, write_shards
from mmpretrain.data.tokenizer import TextTokenizer
from PIL import Image
from test_decode import _png_header_only

from mmpretrain.config import load
from mmpretrain.dataset import make_loader

MARK = "@@NOT-UTF8@@"


def jpeg(h=64, w=80, seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        buf, "JPEG")
    return buf.getvalue()


def sample(i, image=None, text="a red circle."):
    images = [image if image is not None else jpeg(seed=i)]
    return {"id": f"s{i}", "kind": "caption", "segments": [{"image": 0}, {"text": text}],
            "images": images}


def bad_dataset(path):
    good = jpeg()
    samples = [sample(i) for i in range(12)]
    samples[2] = sample(2, b"")  # zero-byte image
    samples[4] = sample(4, good[: len(good) // 2])  # truncated
    samples[5] = sample(5, b"\x00garbage" * 50)  # not an image
    samples[7] = sample(7, _png_header_only(20000, 20000))  # decompression bomb
    samples[8] = sample(8, text="bad \udcff surrogate")  # not valid Unicode
    samples[10] = sample(10, text=MARK)  # made non-UTF-8 in the shard below
    write_shards(path, samples, size_limit=1 << 14)
    for shard in path.glob("shard.*.mds"):
        data = shard.read_bytes()
        if MARK.encode() in data:
            shard.write_bytes(data.replace(MARK.encode(), b"\xff\xfe" * (len(MARK) // 2)))
    return path


def test_bad_samples_are_skipped_counted_and_logged_once(tmp_path, small_dataset, caplog):
    path = bad_dataset(tmp_path / "bad")
    tok = TextTokenizer.load(small_dataset / "tokenizer.json")
    loader = PackedLoader(ShardReader(path), tok, ImageSettings(16, 16, max_pixels=10_000_000,
                                                                 decoder="pillow"), 64, 2)
    with caplog.at_level(logging.WARNING, logger="mmpretrain.data.loader"):
        seqs = list(itertools.islice(loader.sequences(), 12))  # two epochs of the 6 good samples
    assert len(seqs) == 12
    m = loader.metrics()
    assert m["data/skipped_empty_image"] == 2 and m["data/skipped_corrupt_image"] == 4
    assert m["data/skipped_image_too_large"] == 2 and m["data/skipped_bad_text"] == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 6, "each bad sample is logged once, not every epoch"
    assert all("shard." in w and " row " in w for w in warnings)
    next(iter(loader))  # the counts travel in the state, as of the last batch
    assert json.loads(json.dumps(loader.state_dict()))["counts"]["skipped_empty_image"] >= 1


def test_missing_or_broken_shards_fail_at_start_naming_the_file(tmp_path, small_dataset):
    cfg = load(None, [f"data.path={small_dataset}", f"data.datasets=[{{path: {tmp_path / 'ds'}}}]"])
    write_shards(tmp_path / "ds", [sample(i) for i in range(40)], size_limit=1 << 14)
    shards = sorted((tmp_path / "ds").glob("shard.*.mds"))
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        make_loader(cfg, "train", TextTokenizer.load(small_dataset / "tokenizer.json"))
    shards[0].write_bytes(shards[0].read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shards[0].name}.*truncated"):
        ShardReader(tmp_path / "ds")
    (tmp_path / "ds" / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json"):
        ShardReader(tmp_path / "ds")
