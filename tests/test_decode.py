"""Decoding: Pillow and DALI's CPU pipeline give identical pixels for every kind of image (DALI's
GPU decoder within a stated tolerance, on a GPU); bad images (empty, garbage, truncated, over the
pixel limit) are refused with a reason."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from mmpretrain.data.decode import (
    DaliDecoder,
    ImageError,
    PillowDecoder,
    dali_available,
    decode_image,
    make_decoder,
    probe,
)
from mmpretrain.data.pixels import composite_on_white
from PIL import Image
from PIL.JpegImagePlugin import get_sampling

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


def _pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour ramps plus noise: [h, w, 3] uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x * 3 + y * 5) % 256], -1)
    return np.clip(a + rng.integers(-25, 25, a.shape), 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data worth decoding)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b""))
            + _chunk(b"IEND", b""))


def _png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG of [H, W, 3] (RGB) or [H, W, 4] (RGBA) uint16 samples (Pillow writes none)."""
    h, w, c = samples.shape
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


def image_cases() -> dict[str, bytes]:
    """One encoded image per kind the decoders must agree on."""
    base = Image.fromarray(_pixels(72, 120))
    rgba = np.dstack([_pixels(72, 120), (np.arange(120)[None, :] * 2 % 256).repeat(72, 0)])
    rgba_img = Image.fromarray(rgba.astype(np.uint8), "RGBA")
    pal_trans = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    cases = {
        "rgb_jpeg": encode(base, "JPEG", quality=90),
        "rgb_jpeg_444": encode(base, "JPEG", quality=95, subsampling=0),
        "gray_jpeg": encode(base.convert("L"), "JPEG"),
        "cmyk_jpeg": encode(base.convert("CMYK"), "JPEG"),
        "rgb_png": encode(base, "PNG"),
        "gray_png": encode(base.convert("L"), "PNG"),
        "palette_png": encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "palette_transparent_png": encode(pal_trans, "PNG", transparency=0),
        "rgba_png": encode(rgba_img, "PNG"),
        "la_png": encode(rgba_img.convert("LA"), "PNG"),
        "gray16_png": encode(Image.fromarray(
            np.random.default_rng(1).integers(0, 65536, (40, 50)).astype(np.uint16)), "PNG"),
        "rgb16_png": _png16(np.random.default_rng(2).integers(0, 65536, (40, 50, 3))),
        "rgba16_png": _png16(np.random.default_rng(3).integers(0, 65536, (40, 50, 4))),
        "gif": encode(base.convert("P"), "GIF"),
        "webp": encode(base, "WEBP", lossless=True),
    }
    for o in range(1, 9):
        cases[f"exif_{o}_jpeg"] = with_orientation(base, o)
    return cases


CASES = image_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_pillow_decodes_every_kind_to_rgb(name):
    out = decode_image(CASES[name], PillowDecoder())
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    rotated = name.startswith("exif_") and int(name.split("_")[1]) >= 5
    assert out.shape[:2] == ((120, 72) if rotated else ((40, 50) if "16" in name else (72, 120)))


def test_exif_orientation_is_applied():
    base = _pixels(72, 120)
    upright = decode_image(with_orientation(Image.fromarray(base), 1), PillowDecoder()).astype(int)
    turned = decode_image(with_orientation(Image.fromarray(base), 6), PillowDecoder()).astype(int)
    assert np.abs(np.rot90(upright, k=-1) - turned).mean() < 3  # orientation 6: rotate 90 cw


def test_alpha_is_composited_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    out = composite_on_white(rgba)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [200, 0, 0]
    png = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    assert decode_image(png, PillowDecoder())[0, 0].tolist() == [255, 255, 255]
    for mode, key in (("RGB", (200, 0, 0)), ("L", 200)):  # a colour key (tRNS), no alpha channel
        img = Image.fromarray(rgba[..., :3] if mode == "RGB" else rgba[..., 0], mode)
        img.putpixel((3, 3), (10, 20, 30) if mode == "RGB" else 10)
        buf = io.BytesIO()
        img.save(buf, "PNG", transparency=key)
        out = decode_image(buf.getvalue(), PillowDecoder())
        assert out[0, 0].tolist() == [255, 255, 255]  # the key colour is transparent
        assert out[3, 3].tolist() == ([10, 20, 30] if mode == "RGB" else [10, 10, 10])


@needs_dali
@pytest.mark.parametrize("name", sorted(CASES))
def test_dali_cpu_equals_pillow(name):
    dali, pillow = DaliDecoder(device_id=None), PillowDecoder()
    np.testing.assert_array_equal(decode_image(CASES[name], dali), decode_image(CASES[name], pillow))


@needs_dali
@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="DALI's mixed decoder needs a GPU")
def test_dali_mixed_matches_cpu_decode():
    """The GPU decoder (nvJPEG) against the CPU pipeline: the same pixels, except for chroma
    upsampling of subsampled JPEGs (nvJPEG does not interpolate chroma as libjpeg-turbo does).
    On an H100 (DALI 2.4.0) every non-subsampled case was exact, and the 4:2:0 cases (noise-like
    content, the worst for upsampling) differed by up to 92 levels, 3.15 on average: 31.7 dB."""
    gpu, cpu = DaliDecoder(device_id=0), DaliDecoder(device_id=None)
    for name, data in sorted(CASES.items()):
        got, ref = decode_image(data, gpu), decode_image(data, cpu)
        assert got.shape == ref.shape, name
        if not _chroma_subsampled(data):
            np.testing.assert_array_equal(got, ref, err_msg=name)
            continue
        diff = got.astype(np.float64) - ref
        psnr = 10 * np.log10(255**2 / (diff**2).mean())
        assert psnr >= 28 and np.abs(diff).mean() <= 4, (name, psnr, np.abs(diff).mean())


def _chroma_subsampled(data: bytes) -> bool:
    img = Image.open(io.BytesIO(data))
    return img.format == "JPEG" and img.mode == "RGB" and get_sampling(img) > 0


@needs_dali
def test_dali_decodes_jpeg_and_png_itself_and_survives_bad_input():
    dali = DaliDecoder(device_id=None)
    for name in ("rgb_jpeg", "cmyk_jpeg", "palette_png", "rgba_png", "exif_6_jpeg"):
        decode_image(CASES[name], dali)
    assert dali.fallbacks == 0
    jpeg = CASES["rgb_jpeg"]
    with pytest.raises(ImageError) as e:
        decode_image(jpeg[: len(jpeg) // 2], dali)  # DALI fails, Pillow confirms
    assert e.value.reason == "corrupt_image"
    np.testing.assert_array_equal(decode_image(jpeg, dali), decode_image(jpeg, PillowDecoder()))


def test_make_decoder_choices():
    assert make_decoder("pillow").name == "pillow"
    assert make_decoder("auto").name == "pillow"  # no GPU: Pillow, as fast as DALI's CPU pipeline
    if dali_available():
        assert make_decoder("dali").name == "dali" and make_decoder("dali").device_id is None
    with pytest.raises(ValueError, match="unknown decoder"):
        make_decoder("opencv")


@pytest.mark.parametrize("decoder", ["pillow", pytest.param("dali", marks=needs_dali)])
def test_a_limit_above_pillows_own_is_honoured(decoder, monkeypatch):
    """max_pixels above Pillow's bomb limit (its error at twice Image.MAX_IMAGE_PIXELS, 179M
    pixels by default; lowered here so a small image crosses it) lets such an image through the
    probe and the decoder, and leaves Pillow's limit as it was for everyone else."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    rgb = np.random.default_rng(0).integers(0, 255, (2000, 1600, 3), dtype=np.uint8)
    data = encode(Image.fromarray(rgb), "PNG")  # 3.2M pixels: over twice Pillow's 1M
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    assert np.array_equal(decode_image(data, make_decoder(decoder), max_pixels=4_000_000), rgb)
    with pytest.raises(ImageError, match="pixels") as e:
        decode_image(data, make_decoder(decoder), max_pixels=3_000_000)
    assert e.value.reason == "image_too_large" and Image.MAX_IMAGE_PIXELS == 1_000_000


@pytest.mark.parametrize("decoder", ["pillow", pytest.param("dali", marks=needs_dali)])
def test_bad_images_are_refused_with_a_reason(decoder):
    dec = make_decoder(decoder)
    jpeg, png = CASES["rgb_jpeg"], CASES["rgb_png"]
    bad = {
        b"": "empty_image",
        b"not an image at all" * 10: "corrupt_image",
        jpeg[: len(jpeg) // 2]: "corrupt_image",
        png[: len(png) // 2]: "corrupt_image",
        _png_header_only(10_000, 10_000): "image_too_large",  # over our limit
        _png_header_only(100_000, 100_000): "image_too_large",  # over Pillow's own bomb limit
    }
    for data, reason in bad.items():
        with pytest.raises(ImageError) as e:
            decode_image(data, dec, max_pixels=50_000_000)
        assert e.value.reason == reason, (reason, e.value)
        assert " at 0x" not in str(e.value)  # the same text in every run (build summaries)
    big = encode(Image.new("RGB", (3000, 2000)), "PNG")  # a real, highly compressible image
    assert len(big) < 100_000
    with pytest.raises(ImageError, match="pixels"):
        decode_image(big, dec, max_pixels=1_000_000)
    assert probe(big, max_pixels=10_000_000).width == 3000
