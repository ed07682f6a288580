"""Data pipeline benchmark: images/s per core, and packing efficiency.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_pipeline.py [--images 300] [--seed 0]

1. Throughput, one process, one thread: `--images` generated photos of 200-2000 px a side (JPEG,
   a fifth PNG), each through decode + resize (Pixtral's: longest side 1024, 16 px patches) +
   patchify + normalise + pack into encoder streams, via Pillow and via DALI's CPU pipeline,
   against transformers' PixtralImageProcessor on the same bytes in the same run. Images per
   second of CPU time (= per core) and of wall time.
2. Packing efficiency (sample tokens / token slots) on the synthetic mix at the tiny job's
   settings: the best-fit packer against padding every sample to the longest in its batch, and
   against filling rows in arrival order; and as the training loader runs it, one packer per
   micro-batch slot of the global batch (slot j packs samples j, j + S, ...).
Targets: >= 2x the HF processor's images/s, >= 98% packing efficiency.
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from mmpretrain.data.bestfit import BestFitPacker
from mmpretrain.data.decode import dali_available
from mmpretrain.data.images import ImagePreparer, ImageSettings
from mmpretrain.data.packing import RowPacker
from mmpretrain.data.sequence import TokenSequence, build_sequence
from mmpretrain.data.synth import make_sample
from mmpretrain.data.tokenizer import TextTokenizer
from PIL import Image

PATCH, LONGEST = 16, 1024


def photo(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like [h, w, 3] uint8 image: smooth colour fields, edges and sensor noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(20, 90, 6)
    img = np.stack([128 + 90 * np.sin(x / f[0] + y / f[1]), 128 + 90 * np.cos(x / f[2] - y / f[3]),
                    128 + 70 * np.sin((x + y) / f[4]) * np.cos(x / f[5])], -1)
    for _ in range(4):  # a few hard-edged blocks
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        img[y0:y0 + h // 4, x0:x0 + w // 4] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_images(n: int, seed: int) -> list[bytes]:
    """n encoded images, sides uniform in 200-2000 px; JPEG q90, every fifth PNG."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(200, 2001, 2))
        buf = io.BytesIO()
        Image.fromarray(photo(h, w, rng)).save(buf, *(("PNG",) if i % 5 == 4 else ("JPEG",)),
                                               **({} if i % 5 == 4 else {"quality": 90}))
        out.append(buf.getvalue())
    return out


def timed(fn, repeats: int = 2) -> tuple[float, float]:
    """Best (cpu seconds, wall seconds) of `repeats` runs of fn()."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        best = min(best, (time.process_time() - c0, time.perf_counter() - w0))
    return best


def ours(images: list[bytes], decoder: str) -> None:
    """decode + resize + patchify + normalise, then pack the encoder streams (<= 16k patches)."""
    prep = ImagePreparer(ImageSettings(PATCH, (LONGEST // PATCH) ** 2, max_side=LONGEST,
                                       max_upscale=1.0, decoder=decoder))
    _ = prep.decoder  # made before the clock would matter
    packer = BestFitPacker(16384, 1, 0, buffer_tokens=16384, max_patches=16384)
    for k, blob in enumerate(images):
        img = prep(blob)
        n = img.rows * img.cols
        packer.add(k, TokenSequence([1] * n, [False] * n, [img]))
        if packer.full:
            packer.pop_batch()
    while packer.pop_batch() is not None:
        pass


def hf(images: list[bytes], processor) -> None:
    """PixtralImageProcessor on batches of 8 images (PIL decode inside, as a dataset would)."""
    for k in range(0, len(images), 8):
        pil = [Image.open(io.BytesIO(b)) for b in images[k:k + 8]]
        processor(pil, return_tensors="pt")


def throughput(n: int, seed: int) -> dict[str, tuple[float, float]]:
    """Images per CPU second and per wall second of each pipeline."""
    images = make_images(n, seed)
    print(f"{n} images, {sum(map(len, images)) / 2**20:.1f} MiB encoded, sides 200-2000 px")
    runs = {"ours (Pillow)": lambda: ours(images, "pillow")}
    if dali_available():
        runs["ours (DALI CPU)"] = lambda: ours(images, "dali")
    try:
        from transformers import PixtralImageProcessor

        proc = PixtralImageProcessor(size={"longest_edge": LONGEST},
                                     patch_size={"height": PATCH, "width": PATCH})
        runs["HF PixtralImageProcessor"] = lambda: hf(images, proc)
    except ImportError:
        print("transformers is not installed: no HF baseline")
    out = {}
    for name, fn in runs.items():
        cpu, wall = timed(fn)
        out[name] = (n / cpu, n / wall)
        print(f"  {name:26s} {n / cpu:7.1f} images/s per core   ({n / wall:6.1f} /s wall)")
    return out


def synthetic_sequences(n: int, seq_len: int) -> list[TokenSequence]:
    """The synthetic mix at the tiny job's image policy (token budget 36, Pillow)."""
    samples = [make_sample(0, "train", i)[0] for i in range(n)]
    texts = [s["text"] for x in samples for s in x["segments"] if "text" in s]
    tok = TextTokenizer.train(texts, 1024)
    prep = ImagePreparer(ImageSettings(PATCH, 36, decoder="pillow"))
    seqs = [build_sequence(x, tok, prep) for x in samples]
    return [s for s in seqs if len(s) <= seq_len]


def efficiency(seqs: list[TokenSequence], seq_len: int, rows: int) -> dict[str, float]:
    """Sample tokens / token slots: best-fit packing, arrival-order rows, padding to the longest."""
    best = BestFitPacker(seq_len, rows, 0, buffer_tokens=2 * rows * seq_len)
    greedy = RowPacker(seq_len, rows, 0)
    batches_best, batches_greedy = [], []
    for k, s in enumerate(seqs):
        best.add(k, s)
        if best.full:
            batches_best.append(best.pop_batch())
        if (b := greedy.add(s)) is not None:
            batches_greedy.append(b)

    def eff(batches):
        return sum(int((b.sample_ids >= 0).sum()) for b in batches) / sum(b.sample_ids.numel()
                                                                          for b in batches)
    lens = [len(s) for s in seqs]
    padded = [lens[k:k + rows] for k in range(0, len(lens) - rows + 1, rows)]
    return {"best-fit packing": eff(batches_best), "rows in arrival order": eff(batches_greedy),
            "padding to the longest": sum(map(sum, padded)) / sum(len(b) * max(b) for b in padded)}


def slotted_efficiency(seqs: list[TokenSequence], seq_len: int, rows: int, n_slots: int) -> float:
    """Best-fit packing as the loader does it with `n_slots` micro-batch slots: sample k goes to
    slot k mod n_slots, each slot has its own packer (buffer: 2 micro-batches' tokens)."""
    packers = [BestFitPacker(seq_len, rows, 0, buffer_tokens=2 * rows * seq_len)
               for _ in range(n_slots)]
    tokens = capacity = 0
    for k, s in enumerate(seqs):
        packer = packers[k % n_slots]
        packer.add(k, s)
        if packer.full:
            b = packer.pop_batch()
            tokens, capacity = tokens + int((b.sample_ids >= 0).sum()), capacity + b.sample_ids.numel()
    return tokens / capacity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300, help="generated images for throughput")
    p.add_argument("--samples", type=int, default=2000, help="synthetic samples for packing")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("== throughput: decode + resize + patchify + pack, 1 process, 1 thread")
    tp = throughput(args.images, args.seed)
    print("== packing efficiency: synthetic mix, 4 rows x 256 tokens (jobs/tiny-d.yaml)")
    seqs = synthetic_sequences(args.samples, 256)
    effs = efficiency(seqs, 256, 4)
    for name, e in effs.items():
        print(f"  {name:24s} {100 * e:5.1f}%")
    for n_slots in (2, 8):  # tiny-d: 8 sequences per step in micro-batches of 4: 2 slots
        print(f"  {f'best-fit, {n_slots} slots':24s} {100 * slotted_efficiency(seqs, 256, 4, n_slots):5.1f}%")
    base = tp.get("HF PixtralImageProcessor", (float("nan"),))[0]
    speedup = min(v[0] for k, v in tp.items() if k.startswith("ours")) / base
    print(f"== targets: speed-up over HF {speedup:.2f}x (>= 2x: {'PASS' if speedup >= 2 else 'FAIL'}); "
          f"packing {100 * effs['best-fit packing']:.1f}% (>= 98%: "
          f"{'PASS' if effs['best-fit packing'] >= 0.98 else 'FAIL'})")


if __name__ == "__main__":
    main()
