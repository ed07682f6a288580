"""Image ops: encoded bytes -> encoder input, under the native or the NVLM-tiles resize policy.

    bytes ─► decode (DALI | Pillow) [H, W, 3] uint8 ─► resize (native size | tile grid) ─►
    patchify [rows * cols, 3*p*p] uint8 ─► ImagePatches (one, or one per tile)
Patches stay uint8 (a quarter of the memory in the packer's buffer and between processes) until
`pack_rows` normalises the whole encoder stream of a micro-batch in one pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from mmpretrain.data.decode import DEFAULT_MAX_PIXELS, decode_image, make_decoder
from mmpretrain.data.resize import native_size, patchify_uint8, resize, to_tensor
from mmpretrain.data.tiling import choose_grid

NATIVE, THUMBNAIL = 0, -1  # ImagePatches.tile of a whole image / of a global thumbnail


@dataclass
class ImagePatches:
    """One image (or one tile of an image) as encoder input."""

    patches: torch.Tensor  # [rows * cols, 3 * p * p] uint8 pixels (normalised when packed) or
    # float32 already normalised; row-major over the grid, each patch in (channel, y, x) order
    rows: int  # patch rows
    cols: int  # patch columns
    tile: int = NATIVE  # 0: a whole image; k >= 1: the k-th tile; -1: the global thumbnail

    @property
    def positions(self) -> torch.Tensor:
        """[rows * cols, 2] (row, col) of each patch."""
        r = torch.arange(self.rows).repeat_interleave(self.cols)
        c = torch.arange(self.cols).repeat(self.rows)
        return torch.stack([r, c], dim=1)


@dataclass
class ImageSettings:
    """How images become encoder input."""

    patch_size: int
    token_budget: int  # native: most patches per image
    merge: int = 1  # projector pixel shuffle per side: sizes are multiples of patch * merge
    max_upscale: float = 2.0  # native: largest enlargement
    policy: str = "native"  # "native" | "tiles"
    max_tiles: int = 6  # tiles: most tiles per image (the thumbnail not counted)
    tile_size: int = 448  # tiles: side of a tile in pixels
    thumbnail: bool = True  # tiles: add a global thumbnail when there is more than one tile
    max_side: int = 0  # native: longest side in pixels (0: only the budget caps it)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are rejected before decoding
    decoder: str = "auto"  # "auto" | "dali" | "pillow"

    def validate(self) -> None:
        """Raise ValueError for settings that cannot produce valid grids."""
        unit = self.patch_size * self.merge
        if self.policy not in ("native", "tiles"):
            raise ValueError(f"resize policy {self.policy!r} is not 'native' or 'tiles'")
        if self.policy == "tiles" and self.tile_size % unit:
            raise ValueError(f"tile size {self.tile_size} is not a multiple of patch x merge = {unit}")


def native_patches(pixels: np.ndarray, s: ImageSettings) -> ImagePatches:
    """[H, W, 3] uint8 -> one ImagePatches at native resolution under the token budget."""
    h, w = native_size(pixels.shape[0], pixels.shape[1], s.patch_size, s.token_budget, s.merge,
                       s.max_upscale, s.max_side)
    grid = patchify_uint8(resize(to_tensor(pixels), h, w), s.patch_size)  # [r, c, 3pp]
    rows, cols, dim = grid.shape
    return ImagePatches(grid.reshape(rows * cols, dim), rows, cols)


def tiled_patches(pixels: np.ndarray, s: ImageSettings) -> list[ImagePatches]:
    """[H, W, 3] uint8 -> the NVLM tiles in reading order, then the thumbnail (if more than one)."""
    image = to_tensor(pixels)
    gr, gc = choose_grid(pixels.shape[0], pixels.shape[1], s.tile_size, s.max_tiles)
    t = s.tile_size // s.patch_size  # patches per tile side
    grid = patchify_uint8(resize(image, gr * s.tile_size, gc * s.tile_size), s.patch_size)
    tiles = grid.reshape(gr, t, gc, t, -1).permute(0, 2, 1, 3, 4).reshape(gr * gc, t * t, -1)
    out = [ImagePatches(tiles[k].clone(), t, t, k + 1) for k in range(gr * gc)]  # own storage each
    if s.thumbnail and gr * gc > 1:
        thumb = patchify_uint8(resize(image, s.tile_size, s.tile_size), s.patch_size)
        out.append(ImagePatches(thumb.reshape(t * t, -1), t, t, THUMBNAIL))
    return out


class ImagePreparer:
    """Callable: encoded bytes -> ImagePatches (native) or a list of them (tiles).

    Raises decode.ImageError for unusable images. The decoder is made on first use, so a preparer
    can be sent to worker processes before any DALI pipeline exists.
    """

    def __init__(self, settings: ImageSettings, device_id: int | None = None):
        settings.validate()
        self.settings, self.device_id = settings, device_id
        self._decoder = None

    @property
    def decoder(self):
        """The decoder in use (made on first use)."""
        if self._decoder is None:
            self._decoder = make_decoder(self.settings.decoder, self.device_id)
        return self._decoder

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_decoder": None}

    def __call__(self, data: bytes) -> ImagePatches | list[ImagePatches]:
        pixels = decode_image(data, self.decoder, self.settings.max_pixels)  # [H, W, 3] uint8
        if self.settings.policy == "tiles":
            return tiled_patches(pixels, self.settings)
        return native_patches(pixels, self.settings)


def prepare(data: bytes, patch: int, budget: int, merge: int = 1,
            max_upscale: float = 2.0) -> ImagePatches:
    """Encoded image bytes -> normalised patches at native resolution (Pillow decoding)."""
    settings = ImageSettings(patch, budget, merge, max_upscale, decoder="pillow")
    return native_patches(decode_image(data, make_decoder("pillow")), settings)
