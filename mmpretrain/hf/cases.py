"""The inputs `convert verify` feeds both models: text only, one image, several images of different
sizes. Images are random, already normalised patches, the same tensors on both sides.

`sample_cases` writes LLaVA's layout (D at native resolution); `design_cases` writes every
design's layout through the training code's own `build_sequence` (X's `<image>` markers, H's and
tiled D's tile tags, pixel-shuffled placeholders), with tiled images where the job tiles.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmpretrain.config import Config
from mmpretrain.data.images import THUMBNAIL, ImagePatches
from mmpretrain.data.sequence import build_sequence, image_placeholder

TEXTS = ("a red circle at the top left and a blue square in the center.",
         "question: what color is the star? answer: green.", "the second picture shows")


@dataclass
class Case:
    """One input sequence and its images, in placeholder order."""

    name: str
    ids: list[int]
    images: list[ImagePatches]
    anchors: list[int] = field(default_factory=list)  # per image: the token introducing it


def random_image(rows: int, cols: int, patch: int, seed: int, tile: int = 0) -> ImagePatches:
    """A normalised image of rows x cols patches as our encoder reads it."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(rows * cols, 3 * patch * patch, generator=g)  # [n, 3*p*p] (c, y, x)
    return ImagePatches(pixels, rows, cols, tile)


def sample_cases(tok, patch: int, max_side: int = 64) -> list[Case]:
    """Text only; one image; three images of different sizes between text. Grids stay within
    `max_side` patches a side (HF Pixtral's RoPE table)."""
    text = [tok.encode(t) for t in TEXTS]

    def image(rows, cols, seed):
        rows, cols = min(rows, max_side), min(cols, max_side)
        img = random_image(rows, cols, patch, seed)
        return img, image_placeholder(rows, cols, tok.img_id, tok.img_break_id, tok.img_end_id)

    one, one_ids = image(3, 4, 1)
    grids = [image(2, 3, 2), image(4, 2, 3), image(1, 5, 4)]
    several = text[2] + grids[0][1] + text[0] + grids[1][1] + grids[2][1] + text[1]
    bos = [tok.bos_id]
    return [Case("text only", bos + text[0] + text[1], []),
            Case("one image", bos + one_ids + text[0], [one]),
            Case("several images", bos + several, [g[0] for g in grids])]


def tiled_image(cfg: Config, n_tiles: int, seed: int) -> list[ImagePatches]:
    """`n_tiles` tiles (at most data.max_tiles), then a thumbnail when there are several."""
    t, p = cfg.data.tile_size // cfg.vision.patch_size, cfg.vision.patch_size
    n = min(n_tiles, cfg.data.max_tiles)
    out = [random_image(t, t, p, seed * 100 + k, tile=k) for k in range(1, n + 1)]
    if cfg.data.tile_thumbnail and n > 1:
        out.append(random_image(t, t, p, seed * 100, tile=THUMBNAIL))
    return out


def design_cases(cfg: Config, tok, max_side: int = 64) -> list[Case]:
    """The three cases in the layout of `cfg`'s design, resize policy and pixel shuffle. Native
    grids are given in projected tokens (x merge in patches), within `max_side` patches a side."""
    p, m = cfg.vision.patch_size, cfg.projector.merge

    def prepare(spec):  # (rows, cols, seed) of a native image or (n_tiles, seed)
        if cfg.data.resize == "tiles":
            return tiled_image(cfg, *spec[-2:])
        rows, cols, seed = spec
        return random_image(min(rows * m, max_side // m * m), min(cols * m, max_side // m * m), p, seed)

    tiles = cfg.data.resize == "tiles"
    a, b, c, d = ((2, 1), (1, 2), (3, 3), (2, 4)) if tiles else \
        ((3, 4, 1), (2, 3, 2), (4, 2, 3), (1, 5, 4))
    segments = {"text only": [TEXTS[0], TEXTS[1]], "one image": [a, TEXTS[0]],
                "several images": [TEXTS[2], b, TEXTS[0], c, d, TEXTS[1]]}
    cases = []
    for name, segs in segments.items():
        images = [s for s in segs if not isinstance(s, str)]
        sample = {"images": images, "segments": [
            {"text": s} if isinstance(s, str) else {"image": images.index(s)} for s in segs]}
        seq = build_sequence(sample, tok, prepare, m, cfg.model.design)
        cases.append(Case(name, seq.ids, seq.images, seq.anchors))
    return cases
