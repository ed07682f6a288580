"""Image decoding: encoded bytes -> RGB uint8 pixels [H, W, 3], by DALI or Pillow, same pixels.

Every image is first probed from its header (Pillow reads only the header): an empty file, an
unidentifiable one, or one over the pixel limit (a decompression bomb) raises `ImageError` before
any pixel is decoded. Then:

- `PillowDecoder` decodes everything Pillow reads;
- `DaliDecoder` decodes JPEG and PNG with NVIDIA DALI: the CPU pipeline (`device_id=None`) or the
  `mixed` (nvJPEG) decoder on a GPU. Images go through one at a time (DALI cannot batch images of
  different sizes into one tensor) and leave it as host arrays. What DALI does not read, or reads
  differently (GIF, WebP/LA/16-bit alpha, palette transparency), and any image DALI fails on, is
  decoded by Pillow instead, so a bad image is judged the same way by both.

Both apply the EXIF orientation, expand grayscale and palette images, convert CMYK, scale 16-bit
samples with round(v * 255 / 65535), and composite alpha over white with the same functions
(`pixels.py`), so Pillow and DALI's CPU pipeline give identical pixels (tests check each case).
"""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from mmpretrain.data.pixels import ALPHA_MODES, pillow_rgb, to_rgb
from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


class ImageError(ValueError):
    """An image that cannot be used; `reason` is a short metric name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # "empty_image" | "corrupt_image" | "image_too_large"


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an encoded image."""

    format: str  # "JPEG", "PNG", ...
    mode: str  # Pillow mode: "RGB", "L", "P", "RGBA", "CMYK", "I;16", ...
    width: int  # stored width, before the EXIF orientation
    height: int
    has_alpha: bool  # an alpha channel or a transparent palette entry
    deep_color: bool = False  # 16-bit colour samples (PNG), which Pillow reads as their high byte


def _open(data: bytes, allowed: int = 0) -> Image.Image:
    """Image.open that refuses no image of up to `allowed` pixels: Pillow's own limit (a warning
    above Image.MAX_IMAGE_PIXELS, an error above twice it) is raised to `allowed` for this call
    where that is higher, then restored, so a `max_pixels` above Pillow's is honoured."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and allowed > limit:
        Image.MAX_IMAGE_PIXELS = allowed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read the header; raise ImageError for an empty, unidentifiable or over-size image."""
    if len(data) == 0:
        raise ImageError("empty_image", "zero-byte image")
    try:
        img = _open(data, max_pixels)
    except Image.DecompressionBombError as e:
        raise ImageError("image_too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for garbage
        reason = "not a recognised image format" if isinstance(e, Image.UnidentifiedImageError) \
            else str(e)  # Pillow's text for that one names an in-memory object's address
        raise ImageError("corrupt_image", f"unreadable image header: {reason}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError("image_too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    alpha = img.mode in ALPHA_MODES or "transparency" in img.info
    deep = img.mode in ("RGB", "RGBA") and any(";16" in str(t.args) for t in img.tile)
    return ImageInfo(img.format or "", img.mode, w, h, alpha, deep)


class PillowDecoder:
    """Decode with Pillow (libjpeg-turbo, zlib) on the CPU."""

    name = "pillow"

    def __call__(self, data: bytes, info: ImageInfo | None = None) -> np.ndarray:
        """Encoded bytes -> [H, W, 3] uint8; ImageError when the data cannot be decoded."""
        try:
            img = _open(data, info.width * info.height if info else 0)  # probe checked it
            img.load()
            return pillow_rgb(img)
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ImageError("corrupt_image", f"undecodable image: {e}") from None


def dali_available() -> bool:
    """Whether NVIDIA DALI imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliDecoder:
    """Decode JPEG/PNG with DALI, one image per pipeline run; Pillow for the rest.

    `device_id=None` runs DALI's CPU pipeline; an integer runs the `mixed` decoder on that GPU.
    """

    name = "dali"
    FORMATS = {"JPEG": ("RGB", "L", "CMYK"), "PNG": ("RGB", "L", "P", "RGBA")}

    def __init__(self, device_id: int | None = None, num_threads: int = 1):
        if not dali_available():
            raise ImportError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        self.device_id, self.num_threads = device_id, num_threads
        self.pillow = PillowDecoder()
        self._pipes: dict[bool, object] = {}  # keep alpha? -> built pipeline
        self.fallbacks = 0  # images decoded by Pillow instead

    def _pipe(self, alpha: bool):
        if alpha not in self._pipes:
            self._pipes[alpha] = _build_pipeline(self.device_id, self.num_threads, alpha)
        return self._pipes[alpha]

    def handles(self, info: ImageInfo) -> bool:
        """Whether DALI decodes this image to the same pixels as Pillow (not 16-bit colour:
        Pillow keeps each sample's high byte, DALI's samples would be scaled)."""
        modes = self.FORMATS.get(info.format, ())
        if info.mode not in modes or info.deep_color:
            return False
        return not info.has_alpha or info.mode == "RGBA"

    def __call__(self, data: bytes, info: ImageInfo | None = None) -> np.ndarray:
        """Encoded bytes -> [H, W, 3] uint8; ImageError when the data cannot be decoded."""
        info = info or probe(data, max_pixels=1 << 62)
        if not self.handles(info):
            self.fallbacks += 1
            return self.pillow(data, info)
        alpha = info.mode == "RGBA"
        pipe = self._pipe(alpha)
        try:
            pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
            (out,) = pipe.run()
        except RuntimeError:  # a failed pipeline is no longer usable: rebuild it, ask Pillow
            self._pipes.pop(alpha, None)
            self.fallbacks += 1
            return self.pillow(data, info)
        if self.device_id is not None:
            out = out.as_cpu()
        return to_rgb(np.array(out[0]))  # [H, W, C]


def _build_pipeline(device_id: int | None, num_threads: int, alpha: bool):
    """A DALI pipeline: one encoded image in, its decoded pixels out (RGB, or RGBA if `alpha`)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    def decode_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed",
                                 output_type=types.ANY_DATA if alpha else types.RGB)

    pipe = decode_pipeline()
    pipe.build()
    return pipe


def make_decoder(kind: str = "auto", device_id: int | None = None):
    """'pillow'; 'dali' (error if DALI is absent): `mixed` on GPU `device_id`, else the CPU
    pipeline; 'auto': DALI `mixed` when a GPU is given and DALI imports, else Pillow (on CPU,
    DALI's pipeline decodes the same pixels with the same libjpeg-turbo, no faster)."""
    if kind == "pillow" or (kind == "auto" and (device_id is None or not dali_available())):
        return PillowDecoder()
    if kind in ("dali", "auto"):
        return DaliDecoder(device_id)
    raise ValueError(f"unknown decoder {kind!r} (auto, dali, pillow)")


def decode_image(data: bytes, decoder, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Probe, check the limits, decode: bytes -> [H, W, 3] uint8 (EXIF-oriented)."""
    info = probe(data, max_pixels)
    return decoder(data, info)
