"""Pixels as the encoder sees them: any Pillow image or array -> RGB uint8 [H, W, 3].

EXIF orientation applied, grayscale and palette images expanded, CMYK converted, 16-bit samples
scaled with round(v * 255 / 65535) (Pillow itself reads 16-bit colour PNGs as each sample's high
byte), alpha composited over white. Every decoder of the data path
ends here, and Hugging Face exports ship this file (as `nvlm_pixels.py`, numpy and Pillow only) so
that their processor reads an image as training does.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112
TRANSPOSE = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
             4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE],
             6: [Image.Transpose.ROTATE_270], 7: [Image.Transpose.TRANSVERSE],
             8: [Image.Transpose.ROTATE_90]}  # EXIF orientation -> Pillow ops (as exif_transpose)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """[H, W, 4] uint8 -> [H, W, 3] uint8: alpha-blend over an opaque white background."""
    a = rgba[..., 3:4].astype(np.uint32)
    rgb = rgba[..., :3].astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """[H, W] / [H, W, 1|2|3|4] uint8 or uint16 -> [H, W, 3] uint8 (shared by all decoders)."""
    if pixels.dtype == np.uint16:
        pixels = ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    c = pixels.shape[-1]
    if c == 2:  # gray + alpha
        pixels = np.concatenate([np.repeat(pixels[..., :1], 3, -1), pixels[..., 1:]], -1)
        c = 4
    if c == 4:
        return composite_on_white(pixels)
    if c == 1:
        return np.repeat(pixels, 3, -1)
    return pixels


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1: upright; a broken EXIF block counts as 1)."""
    try:
        return int(img.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as by DALI
        return 1


def pillow_array(img: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> array with the channels to_rgb expects."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img).astype(np.uint16)
    if img.mode in ALPHA_MODES or "transparency" in img.info:  # a colour key (tRNS) too
        return np.asarray(img.convert("RGBA"))
    if img.mode in ("RGB", "L"):
        return np.asarray(img)
    return np.asarray(img.convert("RGB"))


def pillow_rgb(img: Image.Image) -> np.ndarray:
    """A Pillow image -> [H, W, 3] uint8, upright by its EXIF orientation."""
    for op in TRANSPOSE.get(orientation(img), []):
        img = img.transpose(op)
    return to_rgb(pillow_array(img))
