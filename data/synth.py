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
from collections.abc import Callable, Iterable, Iterator
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
KINDS = ("caption", "qa", "interleaved")
KIND_WEIGHTS = (0.4, 0.35, 0.25)
TEXTURES = ("noise", "stripes", "gradient")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ORDINALS = ("first", "second", "third")
SPLITS = {"train": 0, "heldout": 1}
SIDE_RANGE = (32, 512)  # pixels, each side
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Shape:
    """One drawn shape: colour and shape names, grid cell (0..8, row-major), centre and size in px."""

    color: str
    shape: str
    cell: int
    cx: int
    cy: int
    size: int

    @property
    def where(self) -> str:
        """Grid position name, e.g. "top left"."""
        return CELLS[self.cell]


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
    colors = rng.choice(list(COLORS), n, replace=False)
    shapes = rng.choice(SHAPES, n, replace=False)
    shapes_out = []
    for color, shape, cell in zip(colors, shapes, sorted(rng.choice(9, n, replace=False))):
        size = int(min(w, h) * rng.uniform(0.22, 0.33))
        x0, y0 = (cell % 3) * w / 3, (cell // 3) * h / 3  # cell's top-left corner
        cx = int(rng.uniform(x0 + size / 2, x0 + w / 3 - size / 2))
        cy = int(rng.uniform(y0 + size / 2, y0 + h / 3 - size / 2))
        shapes_out.append(Shape(str(color), str(shape), int(cell), cx, cy, size))
    texture = str(rng.choice(TEXTURES))
    fmt = "PNG" if rng.random() < 0.3 else "JPEG"
    return Scene(w, h, tuple(shapes_out), texture, int(rng.integers(2**31)), fmt)


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation mid-grey colour, far from every shape colour."""
    grey = rng.uniform(100, 155)
    return grey + rng.uniform(-12, 12, 3)  # [3]


def _background(scene: Scene) -> np.ndarray:
    """The textured background as uint8 [h, w, 3]."""
    rng = np.random.default_rng(scene.texture_seed)
    h, w = scene.height, scene.width
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)  # [h, w] each
    a, b = _muted(rng), _muted(rng)
    if scene.texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        img = a + (b - a) * t[..., None]
    elif scene.texture == "stripes":
        angle = rng.choice([0.0, np.pi / 2, np.pi / 4, 3 * np.pi / 4])
        period = rng.uniform(6, 24)
        on = ((x * np.cos(angle) + y * np.sin(angle)) // (period / 2)) % 2
        img = np.where(on[..., None] > 0, a, b)
    else:
        coarse = rng.normal(0, 1, (max(2, h // 8), max(2, w // 8)))
        coarse = Image.fromarray(coarse.astype(np.float32)).resize((w, h), Image.BILINEAR)
        img = a + 18 * np.asarray(coarse)[..., None]
    img = img + rng.normal(0, 3, (h, w, 1))  # fine grain, same on all channels
    return np.clip(img, 70, 185).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of radius r centred at (cx, cy)."""
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "cross":
        t = 0.35 * r
        pts = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r)]
        pts = pts + [(-px, -py) for px, py in pts]
        return [(cx + px, cy + py) for px, py in pts]
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return list(zip(cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
    raise ValueError(f"unknown polygon shape {shape!r}")


def render(scene: Scene) -> bytes:
    """Encoded image bytes (JPEG or PNG) of a scene; deterministic."""
    img = Image.fromarray(_background(scene))
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        r, fill = s.size / 2, COLORS[s.color]
        box = (s.cx - r, s.cy - r, s.cx + r, s.cy + r)
        if s.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif s.shape == "square":
            draw.rectangle((s.cx - 0.85 * r, s.cy - 0.85 * r, s.cx + 0.85 * r, s.cy + 0.85 * r), fill=fill)
        else:
            draw.polygon(_polygon(s.shape, s.cx, s.cy, r), fill=fill)
    buf = io.BytesIO()
    if scene.fmt == "PNG":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---- texts -------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _place(where: str) -> str:
    """Prepositional phrase of a grid position: "at the top left", "on the left", "in the center"."""
    if where == "center":
        return "in the center"
    if where in ("left", "right"):
        return f"on the {where}"
    return f"at the {where}"


def _plural(n: int, word: str) -> str:
    return f"{NUMBERS[n]} {word}" + ("" if n == 1 else "s")


def describe(scene: Scene) -> str:
    """Caption listing every shape with its colour and position, in reading order."""
    parts = [f"{_article(s.color)} {s.color} {s.shape} {_place(s.where)}" for s in scene.shapes]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body + "."


def _question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """One answerable question about the scene and its answer."""
    s = scene.shapes[int(rng.integers(len(scene.shapes)))]
    kind = int(rng.integers(5))
    if kind == 0:
        return f"what color is the {s.shape}?", f"{s.color}."
    if kind == 1:
        return f"what is {_place(s.where)}?", f"{_article(s.color)} {s.color} {s.shape}."
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
    verb = "is" if total == 1 else "are"
    return f"in all there {verb} {_plural(total, 'shape')}."


# ---- samples -----------------------------------------------------------------------------------


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


def default_heldout(samples: int) -> int:
    """Held-out sample count for a given train count: 5%, at least 64."""
    return max(64, round(0.05 * samples))


def is_complete(path: str | Path) -> bool:
    """Whether `path` holds a finished synthetic dataset."""
    return (Path(path) / ".complete").is_file() and (Path(path) / "meta.json").is_file()


def _progress(total: int, enabled: bool) -> Callable[[], None]:
    """A tick function printing a line on stderr at every 10% of `total`."""
    state = {"done": 0, "shown": 0, "t0": time.perf_counter()}

    def tick() -> None:
        state["done"] += 1
        pct = 100 * state["done"] // total
        if enabled and pct >= state["shown"] + 10:
            state["shown"] = pct - pct % 10
            dt = time.perf_counter() - state["t0"]
            print(f"synth: {pct:3d}% ({state['done']}/{total} samples, {dt:.1f} s)", file=sys.stderr)

    return tick


def _samples(seed: int, split: str, n: int, tick: Callable[[], None]) -> Iterator[dict[str, Any]]:
    for i in range(n):
        sample, _ = make_sample(seed, split, i)
        tick()
        yield sample


def _tap(samples: Iterable[dict], kinds: Counter, texts: list[str] | None) -> Iterator[dict]:
    """Pass samples through, counting kinds and (if `texts` is a list) collecting text segments."""
    for s in samples:
        kinds[s["kind"]] += 1
        if texts is not None:
            texts.extend(seg["text"] for seg in s["segments"] if "text" in seg)
        yield s


def _build(tmp: Path, request: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Write the whole dataset into `tmp`; return its meta."""
    counts = {"train": request["samples"], "heldout": request["heldout"]}
    tick = _progress(sum(counts.values()), progress)
    texts: list[str] = []
    kinds: dict[str, Counter] = {}
    for split, n in counts.items():
        kinds[split] = Counter()
        stream = _tap(_samples(request["seed"], split, n, tick), kinds[split], texts if split == "train" else None)
        write_shards(tmp / split, stream)
    tok = train_tokenizer(texts, request["vocab_size"])
    tok.save(str(tmp / "tokenizer.json"))
    meta = {**request, "train_samples": counts["train"], "heldout_samples": counts["heldout"],
            "tokenizer_vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "kinds": {k: dict(sorted(v.items())) for k, v in kinds.items()}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (tmp / ".complete").touch()
    return meta


def _existing(out: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """Meta of a complete dataset at `out` made by `request`; None if `out` is absent or empty."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if is_complete(out):
        meta = json.loads((out / "meta.json").read_text())
        if all(meta.get(k) == v for k, v in request.items()):
            return meta
        theirs = {k: meta.get(k) for k in request}
        raise ValueError(f"{out} holds a synthetic dataset made with {theirs}, not {request}")
    if any(out.iterdir()):
        raise ValueError(f"{out} exists, is not empty and is not a complete dataset; refusing to overwrite")
    return None


def synthesize(
    out_dir: str | Path,
    samples: int = 4000,
    seed: int = 0,
    heldout: int | None = None,
    vocab_size: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `samples` train + `heldout` held-out samples, tokenizer.json and meta.json; return meta."""
    out = Path(out_dir).absolute()
    heldout = default_heldout(samples) if heldout is None else heldout
    request = {"version": FORMAT_VERSION, "seed": seed, "samples": samples, "heldout": heldout,
               "vocab_size": vocab_size}
    meta = _existing(out, request)
    if meta is not None:
        return meta
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = _build(tmp, request, progress)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            meta = _existing(out, request)
            if meta is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
