"""The synthetic dataset: determinism, images, texts true to the drawn scenes, atomic writing."""

from __future__ import annotations

import dataclasses
import io
import json
import re

import numpy as np
import pytest
from mmpretrain.data import synth
from mmpretrain.data.shards import ShardReader
from mmpretrain.data.synth import COLORS, NUMBERS, SHAPES, SIDE_RANGE, make_sample, synthesize
from mmpretrain.data.tokenizer import TextTokenizer
from PIL import Image

SMALL = {"samples": 24, "heldout": 8, "vocab_size": 320, "progress": False}
N = 90  # samples inspected by make_sample tests


@pytest.fixture(scope="module")
def generated() -> list[tuple[dict, list[synth.Scene]]]:
    return [make_sample(7, "train", i) for i in range(N)]


def _records(path) -> list[dict]:
    return list(ShardReader(path))


def test_same_seed_same_dataset(tmp_path):
    meta_a = synthesize(tmp_path / "a", seed=5, **SMALL)
    meta_b = synthesize(tmp_path / "b", seed=5, **SMALL)
    assert meta_a == meta_b
    for split in ("train", "heldout"):
        assert _records(tmp_path / "a" / split) == _records(tmp_path / "b" / split)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def test_different_seed_different_samples(tmp_path):
    a = [make_sample(1, "train", i)[0] for i in range(8)]
    b = [make_sample(2, "train", i)[0] for i in range(8)]
    held = [make_sample(1, "heldout", i)[0] for i in range(8)]
    for x, y, z in zip(a, b, held):
        assert x["images"] != y["images"] and x["images"] != z["images"]
    assert [x["segments"] for x in a] != [y["segments"] for y in b]


def test_dataset_layout_and_meta(tmp_path):
    meta = synthesize(tmp_path / "ds", seed=3, **SMALL)
    out = tmp_path / "ds"
    assert synth.is_complete(out)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (meta["train_samples"], meta["heldout_samples"], meta["seed"]) == (24, 8, 3)
    assert sum(meta["kinds"]["train"].values()) == 24
    train = _records(out / "train")
    assert len(train) == 24 and len(ShardReader(out / "heldout")) == 8
    assert train[5] == make_sample(3, "train", 5)[0]
    tok = TextTokenizer.load(out / "tokenizer.json")
    assert tok.vocab_size == meta["tokenizer_vocab_size"] <= 320
    text = train[0]["segments"][-1]["text"]
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text)  # some merges were learned


def test_images_decode_with_scene_sizes(generated):
    formats = set()
    for sample, scenes in generated:
        assert len(sample["images"]) == len(scenes)
        for blob, scene in zip(sample["images"], scenes):
            img = Image.open(io.BytesIO(blob))
            formats.add(img.format)
            assert img.size == (scene.width, scene.height)
            assert all(SIDE_RANGE[0] <= s <= SIDE_RANGE[1] for s in img.size)
            assert 1 <= len(scene.shapes) <= 3
            assert len({s.cell for s in scene.shapes}) == len(scene.shapes)
            assert all(s.size >= min(img.size) / 5 for s in scene.shapes)
    assert formats == {"JPEG", "PNG"}


def test_shapes_are_drawn_where_the_scene_says(generated):
    for sample, scenes in generated[:30]:
        for blob, scene in zip(sample["images"], scenes):
            px = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.float32)
            for s in scene.shapes:
                assert s.cx // (scene.width / 3) + 3 * (s.cy // (scene.height / 3)) == s.cell
                patch = px[s.cy - 1 : s.cy + 2, s.cx - 1 : s.cx + 2].reshape(-1, 3).mean(0)
                assert np.abs(patch - COLORS[s.color]).max() < 45, (sample["id"], s)


def test_background_avoids_shape_colors(generated):
    palette = np.array(list(COLORS.values()), dtype=np.float32)  # [8, 3]
    for _, scenes in generated[:20]:
        bare = dataclasses.replace(scenes[0], shapes=(), fmt="PNG")
        px = np.asarray(Image.open(io.BytesIO(synth.render(bare))), dtype=np.float32).reshape(-1, 1, 3)
        assert np.linalg.norm(px - palette, axis=-1).min() > 60


def test_three_kinds_and_images_before_text(generated):
    kinds = {sample["kind"] for sample, _ in generated}
    assert kinds == {"caption", "qa", "interleaved"}
    for sample, scenes in generated:
        segs = sample["segments"]
        assert sorted(s["image"] for s in segs if "image" in s) == list(range(len(scenes)))
        for k, seg in enumerate(segs):
            if "image" in seg:
                assert "text" in segs[k + 1]  # every image is followed by the text about it
        if sample["kind"] != "interleaved":
            assert segs[0] == {"image": 0} and len(segs) == 2
        else:
            assert "text" in segs[0] and "text" in segs[-1] and 1 <= len(scenes) <= 3


def _words(text: str, vocab) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text) if w in vocab}


def _check_description(text: str, scene: synth.Scene) -> None:
    """A description names exactly the drawn colours and shapes, each with its position."""
    assert _words(text, COLORS) == {s.color for s in scene.shapes}
    assert _words(text, SHAPES) == {s.shape for s in scene.shapes}
    for s in scene.shapes:
        assert f"{s.color} {s.shape}" in text
        assert re.search(rf"{s.color} {s.shape} (at|on|in) the {s.where}\b", text)


def _check_answer(question: str, answer: str, scene: synth.Scene) -> None:
    """The answer to a question is true of the scene."""
    by_shape = {s.shape: s for s in scene.shapes}
    pairs = {f"{s.color} {s.shape}": s for s in scene.shapes}
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        assert answer == by_shape[m[1]].color + "."
    elif m := re.fullmatch(r"what is (?:at|on|in) the ([a-z ]+)\?", question):
        (s,) = [s for s in scene.shapes if s.where == m[1]]
        assert answer.endswith(f" {s.color} {s.shape}.")
    elif question == "how many shapes are there?":
        assert answer == NUMBERS[len(scene.shapes)] + "."
    elif m := re.fullmatch(r"where is the (\w+ \w+)\?", question):
        assert answer == pairs[m[1]].where + "."
    elif m := re.fullmatch(r"is there an? (\w+ \w+)\?", question):
        assert answer == ("yes." if m[1] in pairs else "no.")
    else:
        raise AssertionError(f"unexpected question {question!r}")


def test_texts_are_true_to_the_scenes(generated):
    for sample, scenes in generated:
        segs = sample["segments"]
        if sample["kind"] == "caption":
            _check_description(segs[1]["text"], scenes[0])
        elif sample["kind"] == "qa":
            pairs = re.findall(r"question: (.*?\?) answer: (.*?\.)", segs[1]["text"])
            assert 1 <= len(pairs) <= 3
            for q, a in pairs:
                _check_answer(q, a, scenes[0])
        else:
            n = len(scenes)
            assert NUMBERS[n] in segs[0]["text"]
            for k, seg in enumerate(segs):
                if "image" in seg:
                    _check_description(segs[k + 1]["text"], scenes[seg["image"]])
            outro = segs[-1]["text"]
            total = sum(len(sc.shapes) for sc in scenes)
            if m := re.fullmatch(r"the (\w+ \w+) is in the (\w+) picture\.", outro):
                holders = [k for k, sc in enumerate(scenes)
                           if any(f"{s.color} {s.shape}" == m[1] for s in sc.shapes)]
                assert [synth.ORDINALS[k] for k in holders] == [m[2]]
            else:
                assert outro.startswith("in all there") and NUMBERS[total] in outro


def test_atomic_write_on_failure(tmp_path, monkeypatch):
    real = synth.make_sample

    def failing(seed, split, index):
        if index == 10:
            raise RuntimeError("synthesis failed")
        return real(seed, split, index)

    monkeypatch.setattr(synth, "make_sample", failing)
    with pytest.raises(RuntimeError, match="synthesis failed"):
        synthesize(tmp_path / "ds", **SMALL)
    assert list(tmp_path.iterdir()) == []  # no final dir, no leftover temporary dir

    monkeypatch.setattr(synth, "make_sample", real)
    monkeypatch.setattr(synth, "train_tokenizer", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        synthesize(tmp_path / "ds", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_reuse_and_refusal(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    meta = synthesize(out, **SMALL)
    monkeypatch.setattr(synth, "make_sample", None)  # a rebuild would crash
    assert synthesize(out, **SMALL) == meta
    with pytest.raises(ValueError, match="different|made with"):
        synthesize(out, **{**SMALL, "samples": 25})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing"):
        synthesize(tmp_path / "junk", **SMALL)
    (tmp_path / "empty").mkdir()
    monkeypatch.undo()
    meta = synthesize(tmp_path / "empty", samples=24, vocab_size=320, progress=False)
    assert (meta["train_samples"], meta["heldout_samples"]) == (24, 64)  # held out: 5%, at least 64
