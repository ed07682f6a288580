"""Image ops: decode, native-resolution resize under a token budget, normalise, patchify."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

# OpenAI CLIP statistics, as used by Pixtral's processor.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass
class ImagePatches:
    """One image as encoder input."""

    patches: torch.Tensor  # [rows * cols, 3 * p * p] float32, row-major over the grid
    rows: int  # patch rows
    cols: int  # patch columns

    @property
    def positions(self) -> torch.Tensor:
        """[rows * cols, 2] (row, col) of each patch."""
        r = torch.arange(self.rows).repeat_interleave(self.cols)
        c = torch.arange(self.cols).repeat(self.rows)
        return torch.stack([r, c], dim=1)


def decode(data: bytes) -> Image.Image:
    """Decode JPEG/PNG bytes to an RGB Pillow image, applying EXIF orientation."""
    img = Image.open(io.BytesIO(data))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def native_size(height: int, width: int, patch: int, budget: int, merge: int = 1,
                max_upscale: float = 2.0) -> tuple[int, int]:
    """Target (height, width): aspect kept, at most `budget` patches, multiples of patch*merge."""
    unit = patch * merge
    scale = min(max_upscale, math.sqrt(budget * patch * patch / (height * width)))
    h = max(unit, int(height * scale) // unit * unit)
    w = max(unit, int(width * scale) // unit * unit)
    while (h // patch) * (w // patch) > budget:  # extreme aspect ratios: shrink the long side
        if h >= w:
            h -= unit
        else:
            w -= unit
    return h, w


def patchify(pixels: np.ndarray, patch: int) -> ImagePatches:
    """[H, W, 3] float -> patches [rows*cols, 3*p*p] in (channel, y, x) order per patch."""
    h, w, _ = pixels.shape
    rows, cols = h // patch, w // patch
    x = torch.from_numpy(np.ascontiguousarray(pixels)).reshape(rows, patch, cols, patch, 3)
    x = x.permute(0, 2, 4, 1, 3).reshape(rows * cols, 3 * patch * patch)  # [n, 3*p*p]
    return ImagePatches(x.contiguous(), rows, cols)


def prepare(data: bytes, patch: int, budget: int, merge: int = 1,
            max_upscale: float = 2.0) -> ImagePatches:
    """Encoded image bytes -> normalised patches at native resolution."""
    img = decode(data)
    h, w = native_size(img.height, img.width, patch, budget, merge, max_upscale)
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    pixels = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD  # [h, w, 3]
    return patchify(pixels, patch)
