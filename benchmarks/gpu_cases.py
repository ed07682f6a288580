"""Cases of the GPU step benchmark (`gpu_step.py`): model shapes, variants, synthetic packed
batches and their model FLOPs.

Shapes (decoder vocabulary 32000, the Llama-2/Mistral tokenizer's, unless --vocab says otherwise):

    vision "300M"  Pixtral/ViT-L-like: 24 layers, hidden 1024, 16 heads, SwiGLU FFN 2816 (~308M,
                   ViT-L/14's count with a gated MLP), 16 px patches, 2-D RoPE
    1b decoder     Llama-style: 24 layers, hidden 2048, 16 heads / 8 KV groups, FFN 5632
    3b decoder     Llama-3.2-3B: 28 layers, hidden 3072, 24 heads / 8 KV groups, FFN 8192
    smoke          decoder 2 layers, hidden 128, 4 heads / 2 groups, FFN 256; vision 2 layers,
                   hidden 64 (runs on a CPU in seconds)

Designs: D (image tokens in the stream), X (a gated cross-attention layer before every 4th decoder
layer; every 1st in smoke), H (the same, NVLM tiles of 448 px, up to 6 + thumbnail). All use the
2x2 pixel-shuffle projector and native-resolution images under a 1024-patch budget (64 in smoke).

Batches are built the way the loader builds them (`SampleMaker.sequence`: the design's token
layout, truncation of long samples; `BestFitPacker`: best-fit packing under `data.max_patches`),
from a synthetic mix of captions, interleaved documents and text, with source images of 200-2000
px a side resized by the project's own policy (native size or tile grid); pixels are noise.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from mmpretrain.data.bestfit import BestFitPacker
from mmpretrain.data.images import THUMBNAIL, ImagePatches, ImageSettings
from mmpretrain.data.resize import native_size
from mmpretrain.data.source import SampleMaker
from mmpretrain.data.tiling import choose_grid

from mmpretrain.config import Config, ModelConfig
from mmpretrain.dataset import image_settings
from mmpretrain.planner import params as P
from mmpretrain.planner.flops import ModelFlops
from mmpretrain.planner.plan import trainable_total
from mmpretrain.planner.stages import stages_of
from mmpretrain.planner.workload import batch_workload

VISION_300M = ["vision.num_layers=24", "vision.hidden_size=1024", "vision.num_attention_heads=16",
               "vision.ffn_hidden_size=2816", "vision.patch_size=16"]
SIZES: dict[str, list[str]] = {
    "1b": VISION_300M + ["decoder.num_layers=24", "decoder.hidden_size=2048",
                         "decoder.num_attention_heads=16", "decoder.num_query_groups=8",
                         "decoder.ffn_hidden_size=5632"],
    "3b": VISION_300M + ["decoder.num_layers=28", "decoder.hidden_size=3072",
                         "decoder.num_attention_heads=24", "decoder.num_query_groups=8",
                         "decoder.ffn_hidden_size=8192"],
    "smoke": ["vision.num_layers=2", "vision.hidden_size=64", "vision.num_attention_heads=4",
              "vision.ffn_hidden_size=128", "vision.patch_size=16", "decoder.num_layers=2",
              "decoder.hidden_size=128", "decoder.num_attention_heads=4",
              "decoder.num_query_groups=2", "decoder.ffn_hidden_size=256"],
}
PRECISIONS = {"fp32": ["train.precision=fp32"], "bf16": ["train.precision=bf16"],
              "fp8": ["train.precision=bf16", "train.fp8=hybrid"],
              "e4m3": ["train.precision=bf16", "train.fp8=e4m3"]}
SPECS = ("auto", "local", "te")
RECIPES = ("delayed", "tensorwise", "mxfp8")


class Tok:
    """Special-token ids of the layouts (the tokenizer's roles); text is random ids >= 32."""
    pad_id, bos_id, eos_id, img_id, img_break_id, img_end_id, image_marker_id = 0, 1, 2, 3, 4, 5, 6
    thumbnail_id = 7

    def __init__(self, vocab: int, seed: int):
        self.vocab, self.rng = vocab, np.random.default_rng(seed)

    def tile_id(self, k: int) -> int:
        return 7 + k  # <tile_1> .. <tile_12>: 8..19

    def encode(self, text: str) -> list[int]:
        return self.rng.integers(32, self.vocab, len(text)).tolist()


def design_overrides(design: str, size: str) -> list[str]:
    """The design's settings: cross-attention every 4th layer (X/H; every layer in smoke), tiles
    for H."""
    every = 1 if size == "smoke" else 4
    cross = [f"model.design={design}", f"model.cross_attention_every={every}"]
    tile = 64 if size == "smoke" else 448
    return {"d": [], "x": cross, "h": cross + ["data.resize=tiles", f"data.tile_size={tile}",
                                               "data.max_tiles=6"]}[design]


def case_overrides(design: str, size: str, seq: int, micro: int, vocab: int,
                   max_patches: int, accumulate: int = 1) -> list[str]:
    """Config overrides of one case, precision and spec left to the variant; `accumulate`
    micro-batches per step on one GPU."""
    budget = 64 if size == "smoke" else 1024
    patches = max_patches or 4 * seq * micro  # a D row's most: every position a merged token
    return SIZES[size] + design_overrides(design, size) + [
        "projector.merge=2", f"data.image_token_budget={budget}", f"data.max_patches={patches}",
        f"data.seq_length={seq}", f"data.micro_batch_size={micro}",
        f"train.global_batch_size={micro * accumulate}", f"decoder.vocab_size={vocab}",
        "train.steps=1000"]


def _has(section: type, key: str) -> bool:
    return key in {f.name for f in dataclasses.fields(section)}


def variant_overrides(name: str) -> list[str]:
    """`SPEC-PREC[-RECIPE]` (e.g. local-bf16, te-fp8, te-fp8-mxfp8, te-e4m3-tensorwise) as config
    overrides. model.spec=local is left out while the config has no model.spec (local is the
    only spec there); train.fp8_recipe is set only when a recipe is named."""
    parts = name.split("-")
    if len(parts) not in (2, 3) or parts[0] not in SPECS or parts[1] not in PRECISIONS \
            or (len(parts) == 3 and parts[2] not in RECIPES):
        raise ValueError(f"variant {name!r}: expected SPEC-PREC[-RECIPE], SPEC in {SPECS}, "
                         f"PREC in {tuple(PRECISIONS)}, RECIPE in {RECIPES}")
    spec = [] if parts[0] == "local" and not _has(ModelConfig, "spec") else [f"model.spec={parts[0]}"]
    recipe = [f"train.fp8_recipe={parts[2]}"] if len(parts) == 3 else []
    return spec + PRECISIONS[parts[1]] + recipe


def fp8_recipe(cfg: Config) -> str:
    """The resolved FP8 recipe, '' without FP8."""
    if cfg.train.fp8 is None:
        return ""
    recipe = getattr(cfg.train, "fp8_recipe", None)
    return f"{cfg.train.fp8}/{recipe}" if recipe else cfg.train.fp8


# ---------------------------------------------------------------- synthetic batches


def noise_image(rows: int, cols: int, patch: int, g: torch.Generator, tile: int = 0) -> ImagePatches:
    """An image of rows x cols patches of uint8 noise."""
    pixels = torch.randint(0, 256, (rows * cols, 3 * patch * patch), dtype=torch.uint8, generator=g)
    return ImagePatches(pixels, rows, cols, tile)  # [rows * cols, 3pp]


def image_of(size: tuple[int, int], s: ImageSettings, g: torch.Generator):
    """A source image of (h, w) pixels as the resize policy makes it: native or tiles + thumbnail."""
    h, w, p = size[0], size[1], s.patch_size
    if s.policy == "tiles":
        gr, gc = choose_grid(h, w, s.tile_size, s.max_tiles)
        t = s.tile_size // p
        parts = [noise_image(t, t, p, g, k + 1) for k in range(gr * gc)]
        thumb = [noise_image(t, t, p, g, THUMBNAIL)] if s.thumbnail and gr * gc > 1 else []
        return parts + thumb
    h, w = native_size(h, w, p, s.token_budget, s.merge, s.max_upscale, s.max_side)
    return noise_image(h // p, w // p, p, g)


def synthetic_sample(rng: np.random.Generator) -> dict:
    """A caption (50%), an interleaved document of 2-4 images (35%) or text alone (15%); images
    are (h, w) source sizes, text segments strings of their token count."""
    def text(lo, hi):
        return {"text": "x" * int(rng.integers(lo, hi))}
    images = [tuple(int(v) for v in rng.integers(200, 2001, 2)) for _ in range(4)]
    kind = rng.choice(3, p=[0.5, 0.35, 0.15])
    if kind == 0:
        return {"segments": [{"image": 0}, text(16, 96)], "images": images[:1]}
    if kind == 1:
        n = int(rng.integers(2, 5))
        segs = [s for i in range(n) for s in (text(32, 256), {"image": i})] + [text(32, 256)]
        return {"segments": segs, "images": images[:n]}
    return {"segments": [text(256, 2048)], "images": []}


def make_batches(cfg: Config, n: int, seed: int = 0) -> list:
    """`n` micro-batches packed as the loader packs them."""
    d, tok, g = cfg.data, Tok(cfg.decoder.vocab_size, seed), torch.Generator().manual_seed(seed)
    settings = image_settings(cfg)
    maker = SampleMaker(None, tok, lambda size: image_of(size, settings, g), cfg.projector.merge,
                        d.seq_length, d.max_patches, "truncate", cfg.model.design)
    packer = BestFitPacker(d.seq_length, d.micro_batch_size, tok.pad_id,
                           int(d.pack_buffer * d.micro_batch_size * d.seq_length), d.max_patches)
    rng, batches, k = np.random.default_rng(seed), [], 0
    while len(batches) < n:
        seq, _ = maker.sequence(synthetic_sample(rng))
        if seq is not None:
            packer.add(k, seq)
            k += 1
        if packer.full:
            batches.append(packer.pop_batch())
    return batches


# ---------------------------------------------------------------- model FLOPs (the planner's)


def model_flops(cfg: Config, batch) -> float:
    """Model FLOPs of one forward+backward of `batch` (encoder, projector, decoder, cross-attention
    and head), counted by the planner for a one-stage layout."""
    vocab = cfg.decoder.vocab_size
    flops = ModelFlops(cfg, P.count(cfg, vocab), batch_workload(cfg, batch), vocab)
    return sum(flops.stage(st).total for st in stages_of(cfg))


def trainable_params(cfg: Config) -> int:
    """The planner's count of the parameters that train."""
    return trainable_total(cfg, P.count(cfg, cfg.decoder.vocab_size))
