"""The synthetic default dataset: coloured shapes on textured backgrounds, with texts about them.

Each image holds 1-3 shapes (distinct shapes, distinct colours) in distinct cells of a 3x3 grid.
Texts name the colours, shapes, counts and positions, always after the image they describe:
    caption      [image, text]                 "a red circle at the top left and a blue square in the center."
    qa           [image, text]                 "question: what color is the star? answer: green."
    interleaved  [text, (image, text) x 1-3, text]
Everything is a function of (seed, split, index): the same seed gives the same segments and the
same image bytes. `synthesize` writes train/heldout MDS shards, a tokenizer and meta.json.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .shards import write_shards
from .tokenizer import train_tokenizer

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 225), "yellow": (245, 215, 20),
    "purple": (140, 50, 190), "orange": (245, 130, 20), "white": (250, 250, 250), "black": (10, 10, 10),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PLACES = {c: "in the center" if c == "center" else f"on the {c}" if c in ("left", "right") else f"at the {c}"
          for c in CELLS}  # "top left" -> "at the top left", "left" -> "on the left"
KINDS = ("caption", "qa", "interleaved")
KIND_WEIGHTS = (0.4, 0.35, 0.25)
TEXTURES = ("noise", "stripes", "gradient")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ORDINALS = ("first", "second", "third")
SPLITS = {"train": 0, "heldout": 1}
SIDE_RANGE = (32, 512)  # pixels, each side
FORMAT_VERSION = 1

_T = 0.35  # half-width of the cross's arms
_STAR = [(-np.pi / 2 + k * np.pi / 5, 1.0 if k % 2 == 0 else 0.45) for k in range(10)]  # (angle, radius)
POLYGONS: dict[str, list[tuple[float, float]]] = {  # vertices on the unit radius, y pointing down
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0, -1), (1, 0.8), (-1, 0.8)],
    "diamond": [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)],
    "cross": [(_T, 1), (_T, _T), (1, _T), (1, -_T), (_T, -_T), (_T, -1),
              (-_T, -1), (-_T, -_T), (-1, -_T), (-1, _T), (-_T, _T), (-_T, 1)],
    "star": [(r * float(np.cos(a)), r * float(np.sin(a))) for a, r in _STAR],
}


@dataclass(frozen=True)
class Shape:
    """One drawn shape: names of colour and shape, grid cell (0..8, row-major) and its name, centre, size."""

    color: str
    shape: str
    cell: int
    where: str  # CELLS[cell], e.g. "top left"
    cx: int  # px
    cy: int  # px
    size: int  # px, bounding-box side


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image; shapes are listed in grid (reading) order."""

    width: int
    height: int
    shapes: tuple[Shape, ...]
    texture: str
    texture_seed: int
    fmt: str  # "JPEG" | "PNG"


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene: size, 1-3 shapes in distinct cells, texture and file format."""
    long = int(np.exp(rng.uniform(np.log(96), np.log(SIDE_RANGE[1]))))
    short = max(SIDE_RANGE[0], int(long * rng.uniform(0.4, 1.0)))
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    n = int(rng.integers(1, 4))
    colors, shapes = rng.choice(list(COLORS), n, replace=False), rng.choice(SHAPES, n, replace=False)
    shapes_out = []
    for color, shape, cell in zip(colors, shapes, sorted(rng.choice(9, n, replace=False))):
        size = int(min(w, h) * rng.uniform(0.22, 0.33))
        x0, y0 = (cell % 3) * w / 3, (cell // 3) * h / 3  # cell's top-left corner
        cx = int(rng.uniform(x0 + size / 2, x0 + w / 3 - size / 2))
        cy = int(rng.uniform(y0 + size / 2, y0 + h / 3 - size / 2))
        shapes_out.append(Shape(str(color), str(shape), int(cell), CELLS[cell], cx, cy, size))
    fmt = "PNG" if rng.random() < 0.3 else "JPEG"
    return Scene(w, h, tuple(shapes_out), str(rng.choice(TEXTURES)), int(rng.integers(2**31)), fmt)


def _background(scene: Scene) -> np.ndarray:
    """The textured background as uint8 [h, w, 3]."""
    rng = np.random.default_rng(scene.texture_seed)
    h, w = scene.height, scene.width
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)  # [h, w] each
    a, b = rng.uniform(100, 155, (2, 1)) + rng.uniform(-12, 12, (2, 3))  # two muted colours, [3] each
    if scene.texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        img = a + (b - a) * t[..., None]
    elif scene.texture == "stripes":
        angle = rng.choice([0.0, np.pi / 2, np.pi / 4, 3 * np.pi / 4])
        on = ((x * np.cos(angle) + y * np.sin(angle)) // rng.uniform(3, 12)) % 2  # half-period 3-12 px
        img = np.where(on[..., None] > 0, a, b)
    else:
        coarse = rng.normal(0, 1, (max(2, h // 8), max(2, w // 8)))
        coarse = Image.fromarray(coarse.astype(np.float32)).resize((w, h), Image.BILINEAR)
        img = a + 18 * np.asarray(coarse)[..., None]
    img = img + rng.normal(0, 3, (h, w, 1))  # fine grain, same on all channels
    return np.clip(img, 70, 185).astype(np.uint8)


def render(scene: Scene) -> bytes:
    """Encoded image bytes (JPEG or PNG) of a scene; deterministic."""
    img = Image.fromarray(_background(scene))
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        r, fill = s.size / 2, COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse((s.cx - r, s.cy - r, s.cx + r, s.cy + r), fill=fill)
        else:
            draw.polygon([(s.cx + r * x, s.cy + r * y) for x, y in POLYGONS[s.shape]], fill=fill)
    buf = io.BytesIO()
    options = {"compress_level": 1} if scene.fmt == "PNG" else {"quality": 90}
    img.save(buf, format=scene.fmt, **options)
    return buf.getvalue()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(scene: Scene) -> str:
    """Caption listing every shape with its colour and position, in reading order."""
    parts = [f"{_article(s.color)} {s.color} {s.shape} {PLACES[s.where]}" for s in scene.shapes]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body + "."


def _question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """One answerable question about the scene and its answer."""
    s = scene.shapes[int(rng.integers(len(scene.shapes)))]
    kind = int(rng.integers(5))
    if kind == 0:
        return f"what color is the {s.shape}?", f"{s.color}."
    if kind == 1:
        return f"what is {PLACES[s.where]}?", f"{_article(s.color)} {s.color} {s.shape}."
    if kind == 2:
        return "how many shapes are there?", f"{NUMBERS[len(scene.shapes)]}."
    if kind == 3:
        return f"where is the {s.color} {s.shape}?", f"{s.where}."
    present = {(t.color, t.shape) for t in scene.shapes}
    if rng.random() < 0.5:
        return f"is there {_article(s.color)} {s.color} {s.shape}?", "yes."
    absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
    color, shape = absent[int(rng.integers(len(absent)))]
    return f"is there {_article(color)} {color} {shape}?", "no."


def qa_text(scene: Scene, rng: np.random.Generator) -> str:
    """1-3 distinct question/answer pairs about one scene."""
    pairs: list[tuple[str, str]] = []
    for _ in range(int(rng.integers(1, 4))):
        q, a = _question(scene, rng)
        if all(q != p for p, _ in pairs):
            pairs.append((q, a))
    return " ".join(f"question: {q} answer: {a}" for q, a in pairs)


def _outro(scenes: list[Scene], rng: np.random.Generator) -> str:
    """Closing sentence about all pictures: the total count, or which picture holds a shape."""
    total = sum(len(sc.shapes) for sc in scenes)
    counts = Counter((s.color, s.shape) for sc in scenes for s in sc.shapes)
    if len(scenes) > 1 and rng.random() < 0.5:
        k = int(rng.integers(len(scenes)))
        unique = [s for s in scenes[k].shapes if counts[(s.color, s.shape)] == 1]
        if unique:
            s = unique[int(rng.integers(len(unique)))]
            return f"the {s.color} {s.shape} is in the {ORDINALS[k]} picture."
    return "in all there is one shape." if total == 1 else f"in all there are {NUMBERS[total]} shapes."


def make_sample(seed: int, split: str, index: int) -> tuple[dict[str, Any], list[Scene]]:
    """The sample (id, kind, segments, images) at (seed, split, index) and the scenes of its images."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    kind = str(rng.choice(KINDS, p=KIND_WEIGHTS))
    n_images = int(rng.integers(1, 4)) if kind == "interleaved" else 1
    scenes = [sample_scene(rng) for _ in range(n_images)]
    if kind == "caption":
        segments: list[dict[str, Any]] = [{"image": 0}, {"text": describe(scenes[0])}]
    elif kind == "qa":
        segments = [{"image": 0}, {"text": qa_text(scenes[0], rng)}]
    else:
        intro = "here is one picture." if n_images == 1 else f"here are {NUMBERS[n_images]} pictures."
        segments = [{"text": intro}]
        for k, sc in enumerate(scenes):
            segments += [{"image": k}, {"text": f"the {ORDINALS[k]} picture shows {describe(sc)}"}]
        segments.append({"text": _outro(scenes, rng)})
    sample = {"id": f"{split}-{index:07d}", "kind": kind, "segments": segments,
              "images": [render(sc) for sc in scenes]}
    return sample, scenes


def is_complete(path: str | Path) -> bool:
    """Whether `path` holds a finished synthetic dataset."""
    return (Path(path) / ".complete").is_file() and (Path(path) / "meta.json").is_file()


def _samples(seed: int, split: str, n: int, progress: bool, kinds: Counter, texts: list[str],
             ) -> Iterator[dict[str, Any]]:
    """Samples 0..n-1 of a split, counting kinds, collecting texts and printing progress on stderr."""
    t0 = time.perf_counter()
    for i in range(n):
        sample, _ = make_sample(seed, split, i)
        kinds[sample["kind"]] += 1
        texts.extend(seg["text"] for seg in sample["segments"] if "text" in seg)
        yield sample
        if progress and 10 * (i + 1) // n > 10 * i // n:
            print(f"synth: {split} {i + 1}/{n} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)


def _build(tmp: Path, request: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Write the whole dataset into `tmp`; return its meta."""
    counts = {"train": request["samples"], "heldout": request["heldout"]}
    kinds = {split: Counter() for split in counts}
    texts: dict[str, list[str]] = {split: [] for split in counts}
    for split, n in counts.items():
        write_shards(tmp / split, _samples(request["seed"], split, n, progress, kinds[split], texts[split]))
    tok = train_tokenizer(texts["train"], request["vocab_size"])
    tok.save(str(tmp / "tokenizer.json"))
    meta = {**request, "train_samples": counts["train"], "heldout_samples": counts["heldout"],
            "tokenizer_vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "kinds": {k: dict(sorted(v.items())) for k, v in kinds.items()}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (tmp / ".complete").touch()
    return meta


def _existing(out: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """Meta of a complete dataset at `out` made by `request`; None if `out` is absent or empty."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not is_complete(out):
        raise ValueError(f"{out} exists and is neither empty nor a complete dataset; refusing to overwrite")
    meta = json.loads((out / "meta.json").read_text())
    if any(meta.get(k) != v for k, v in request.items()):
        raise ValueError(f"{out} holds a synthetic dataset made with {({k: meta.get(k) for k in request})}, "
                         f"not {request}")
    return meta


def synthesize(out_dir: str | Path, samples: int = 4000, seed: int = 0, heldout: int | None = None,
               vocab_size: int = 1024, progress: bool = True) -> dict[str, Any]:
    """Write `samples` train + `heldout` held-out samples, tokenizer.json and meta.json; return meta."""
    out = Path(out_dir).absolute()
    heldout = max(64, round(0.05 * samples)) if heldout is None else heldout
    request = {"version": FORMAT_VERSION, "seed": seed, "samples": samples, "heldout": heldout,
               "vocab_size": vocab_size}
    if (meta := _existing(out, request)) is not None:
        return meta
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        meta = _build(tmp, request, progress)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            tmp.rename(out)
        except OSError:  # a concurrent run finished first: keep its dataset if it is the same
            if _existing(out, request) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful rename
    return meta
