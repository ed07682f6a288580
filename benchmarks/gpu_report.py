"""Reporting for the GPU step benchmark (`gpu_step.py`): a result row, the GPU peak it is measured
against, the header naming machine, versions and command, the markdown table of step results,
and the DALI decode comparison (its own table).
"""
from __future__ import annotations

import io
import platform
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
from data_pipeline import photo, timed
from mmpretrain.data.decode import DaliDecoder, PillowDecoder, dali_available, decode_image
from PIL import Image

from mmpretrain.planner.hardware import GPU, GPUS

COLUMNS = ["design", "size", "params", "variant", "fp8", "rows x micro-batches", "step (ms)",
           "tokens/s", "TFLOP/s", "MFU", "peak mem (GiB)", "loss", "status"]


@dataclass
class Row:
    """One case x variant: its measurements, or why it did not run."""

    design: str
    size: str
    params: int
    variant: str
    status: str = "ok"
    step_s: float = 0.0
    tokens_s: float = 0.0
    tflops: float = 0.0
    mfu: float | None = None
    peak_gib: float | None = None
    loss: float = 0.0
    fp8: str = ""
    profile: str = ""
    batch: str = "-"  # rows per micro-batch x micro-batches per step


def gpu_peak(kind: str | None) -> GPU | None:
    """The planner's entry for this GPU (by --gpu, else by the device name); None on CPU."""
    if kind:
        return GPUS[kind]
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).lower()  # the table's peaks are the SXM parts'
    return next((g for key, g in GPUS.items() if key in name), None)


def _version(*names: str) -> str:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    return "absent"


def header(gpu, command: str) -> str:
    """Lines to put above the tables: device, MFU's peak, package versions, the command."""
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (capability {torch.cuda.get_device_capability(0)})"
    else:
        device = f"no GPU (CPU: {platform.machine()}, {torch.get_num_threads()} thread(s))"
    peak = f"MFU against the planner's dense bf16 peak of {gpu.name}, {gpu.bf16_tflops:.0f} TFLOP/s, " \
           "for bf16 and fp8 runs alike" if gpu else "MFU: no GPU peak known for this device"
    versions = ", ".join(f"{k} {_version(*v)}" for k, v in {
        "torch": ("torch",), "megatron-core": ("megatron-core",),
        "transformer-engine": ("transformer-engine", "transformer_engine"),
        "DALI": ("nvidia-dali-cuda130", "nvidia-dali-cuda120")}.items())
    return "\n".join([f"Device: {device}; {peak}.", f"Versions: {versions}; {time.strftime('%Y-%m-%d')}.",
                      f"Command: `{command}`"])


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _cells(r: Row) -> list[str]:
    if r.status != "ok":
        return [r.design, r.size, _params(r.params), r.variant, r.fp8 or "-", r.batch] \
            + ["-"] * 6 + [r.status.replace("|", "\\|")]
    return [r.design, r.size, _params(r.params), r.variant, r.fp8 or "-", r.batch,
            f"{1e3 * r.step_s:.1f}", f"{r.tokens_s:,.0f}", f"{r.tflops:.3g}",
            f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-",
            f"{r.peak_gib:.1f}" if r.peak_gib is not None else "-", f"{r.loss:.3f}", "ok"]


def summary(r: Row) -> str:
    """One line of a measured row, or its status."""
    if r.status != "ok":
        return r.status
    mfu = f", MFU {100 * r.mfu:.1f}%" if r.mfu is not None else ""
    peak = f", peak {r.peak_gib:.1f} GiB" if r.peak_gib is not None else ""
    return f"{r.tokens_s:,.0f} tokens/s, {r.tflops:.3g} TFLOP/s{mfu}{peak}, step " \
           f"{1e3 * r.step_s:.1f} ms, loss {r.loss:.3f}"


def table(rows) -> str:
    """One markdown row per case x variant."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(_cells(r)) + " |" for r in rows])


# ---------------------------------------------------------------- DALI decoding


def jpegs(n: int, seed: int, lo: int, hi: int) -> list[bytes]:
    """n photo-like JPEGs (q90), sides uniform in lo..hi px (data_pipeline's generator)."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
        buf = io.BytesIO()
        Image.fromarray(photo(h, w, rng)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _decoders() -> dict[str, object]:
    """Decoder name -> factory, or the reason it cannot run here."""
    no_dali = "skipped: NVIDIA DALI is not installed"
    return {"Pillow (CPU)": PillowDecoder,
            "DALI CPU pipeline": (lambda: DaliDecoder(None)) if dali_available() else no_dali,
            "DALI mixed (nvJPEG, GPU 0)": no_dali if not dali_available() else
            "skipped: no CUDA device" if not torch.cuda.is_available() else (lambda: DaliDecoder(0))}


def _rate(make, images: list[bytes]) -> str:
    """'wall images/s | per-core images/s | ok' of decoding all images (best of 2), or the failure."""
    try:
        decoder = make()
        decode_image(images[0], decoder)  # builds the pipeline before the clock starts
        cpu, wall = timed(lambda: [decode_image(b, decoder) for b in images])
    except Exception as e:  # noqa: BLE001 - a decoder that fails here is reported, not fatal
        return f"- | - | failed: {type(e).__name__}: {str(e).strip()[:200]}"
    return f"{len(images) / wall:.1f} | {len(images) / cpu:.1f} | ok"


def dali_rows(n: int, seed: int, small: bool = False) -> str:
    """The DALI comparison as a markdown table ('' when n is 0)."""
    if n <= 0:
        return ""
    lo, hi = (64, 512) if small else (200, 2000)
    images = jpegs(n, seed, lo, hi)
    mib = sum(map(len, images)) / 2**20
    lines = [f"DALI decoding: {n} JPEGs (q90), sides {lo}-{hi} px, {mib:.1f} MiB, one image per call "
             "(decode_image: probe + decode to host RGB uint8), best of 2 passes.", "",
             "| decoder | images/s (wall) | images/s per CPU core | status |", "|---|---|---|---|"]
    for name, make in _decoders().items():
        cells = f"- | - | {make}" if isinstance(make, str) else _rate(make, images)
        lines.append(f"| {name} | {cells} |")
        print(f"   decode {name}: {cells}", flush=True)
    return "\n".join(lines)
