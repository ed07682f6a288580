"""What one micro-batch holds, and the numerics the planner assumes.

The decoder sees `micro_batch` packed rows of `seq_length` tokens. Images reach it two ways: as
projected embeddings in the token stream (design D; H's thumbnails), or as the keys and values of
the gated cross-attention layers (X: every image, one `<image>` marker in the stream; H: the
regular tiles, one tile tag each). Each projected token stands for merge^2 encoder patches, and all
patches of the micro-batch form one encoder stream. Memory is planned for the worst case by default:
every decoder position an image placeholder, marker or tag (`image_fraction` 1), images at their
largest (D: the token budget or a tile per position; X: a whole tiled image per marker; H: one
tile per tag, the most cross-attended tokens per decoder position), capped by `data.max_patches`
when set (the packer's cap on one micro-batch's encoder stream; X and H need it under pipeline
parallelism, where the image context travels between stages in rows sized for it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from mmpretrain.config import Config

Spec = Literal["te", "local"]


@dataclass(frozen=True)
class Workload:
    """Sizes of one micro-batch."""

    seq_length: int
    micro_batch: int
    image_tokens: int
    """Projected image tokens of the micro-batch (the projector's output; for D all of them sit in
    the decoder stream)."""
    patches: int
    """Length of the encoder stream (image_tokens * merge^2)."""
    images: int
    """Images in the micro-batch (the encoder's attention is block-diagonal over them)."""
    cross_tokens: int = 0
    """Projected image tokens the cross-attention layers read (X/H; 0 for D): their keys/values."""
    cross_width: int = 0
    """Keys per row of the cross-attention (each row attends to its own images, padded to the
    row with the most); 0: all cross_tokens in one row, the worst case."""
    patch_rows: int = 0
    """Rows of the encoder's padded per-image batch (images x the longest); 0: the patches (all
    images of one size)."""

    @property
    def tokens(self) -> int:
        """Decoder positions of the micro-batch."""
        return self.seq_length * self.micro_batch

    @property
    def keys_per_row(self) -> int:
        """kr: the cross-attention's keys per row."""
        return self.cross_width or self.cross_tokens

    @property
    def padded_patches(self) -> int:
        """The encoder's patches padded per image to the longest (local spec's packed attention)."""
        return self.patch_rows or self.patches

    @classmethod
    def from_config(cls, cfg: Config, image_fraction: float = 1.0) -> Workload:
        """A micro-batch whose positions are `image_fraction` image positions (placeholders for D,
        markers for X, tile tags for H), in full-size images, capped by data.max_patches."""
        if not 0.0 <= image_fraction <= 1.0:
            raise ValueError(f"image fraction must be in [0, 1], got {image_fraction}")
        d, m = cfg.data, cfg.projector.merge
        s, b = d.seq_length, d.micro_batch_size
        positions = int(image_fraction * s * b)
        design = cfg.model.design
        if design == "d":
            patches = positions * m * m  # one projected token per position
        elif design == "x":
            patches = positions * source_image_patches(cfg)  # a whole image per <image> marker
        else:  # h: one tile per tag, all of it cross-attended (single-tile images)
            patches = positions * patches_per_image(cfg)
        if getattr(d, "max_patches", 0):  # the packer's cap on one micro-batch's encoder stream
            patches = min(patches, d.max_patches)
        image_tokens = patches // (m * m)
        images = math.ceil(patches / patches_per_image(cfg)) if patches else 0
        cross = image_tokens if design in ("x", "h") else 0
        return cls(s, b, image_tokens, patches, images, cross)


def patches_per_image(cfg: Config) -> int:
    """Patches of the largest image the encoder sees: a tile under NVLM tiling, else the token
    budget."""
    d = cfg.data
    if getattr(d, "resize", "native") == "tiles":
        return (d.tile_size // cfg.vision.patch_size) ** 2
    return d.image_token_budget


def source_image_patches(cfg: Config) -> int:
    """Patches of the largest source image: max_tiles tiles and the thumbnail under tiling."""
    d = cfg.data
    if getattr(d, "resize", "native") == "tiles":
        thumbnail = 1 if d.tile_thumbnail and d.max_tiles > 1 else 0
        return (d.max_tiles + thumbnail) * patches_per_image(cfg)
    return d.image_token_budget


def context_capacity(cfg: Config) -> int:
    """Rows x micro-batch of the image context X/H send between pipeline stages (their model pads
    the context to data.max_patches / merge^2 tokens, in rows of micro_batch_size); 0 without."""
    if cfg.model.design == "d" or cfg.parallel.pp == 1 or not cfg.data.max_patches:
        return 0
    b = cfg.data.micro_batch_size
    return math.ceil(cfg.data.max_patches // cfg.projector.merge ** 2 / b) * b


@dataclass(frozen=True)
class Numerics:
    """Precision and kernels.

    spec 'te' is the Transformer Engine layer spec used on GPUs (flash attention over packed
    sequences, fused RoPE and SwiGLU, FP8 when asked); 'local' is megatron-core's portable spec the
    CPU runs: it materialises the [heads, s, s] attention scores (the encoder's over the whole
    packed image stream) and keeps RoPE's cos/sin per layer.
    """

    param_bytes: int
    """2 for bf16 parameters and activations, 4 for fp32."""
    spec: Spec = "te"
    recompute: str = "none"
    fp8: bool = False

    @classmethod
    def from_config(cls, cfg: Config, spec: Spec = "te", on_gpu: bool = True) -> Numerics:
        """The config's numerics; precision 'auto' is bf16 on GPUs and fp32 on CPU."""
        p = cfg.train.precision
        fp32 = p == "fp32" or (p == "auto" and not on_gpu)
        fp8 = cfg.train.fp8 is not None
        if fp8 and spec != "te":
            raise ValueError("train.fp8 needs the Transformer Engine spec")
        return cls(4 if fp32 else 2, spec, cfg.train.recompute, fp8)

    @property
    def linear_input_bytes(self) -> int:
        """Bytes per element of what a linear layer keeps of its input (FP8: one byte)."""
        return 1 if self.fp8 else self.param_bytes


def batch_workload(cfg: Config, batch) -> Workload:
    """The planner's Workload of a real micro-batch: projected and cross-attended image tokens,
    each row's keys (padded to the row with the most), the encoder's padded per-image batch."""
    m = cfg.projector.merge
    tokens = batch.tokens_per_image(m)  # [n_images]
    cross = width = 0
    if cfg.model.design != "d":
        in_stream = batch.images_in_stream(cfg.model.design)
        cross = int(tokens[~in_stream].sum())
        width = batch.cross_attention_rows(~in_stream, m)[0].shape[1]
    patches = batch.image_sizes[:, 0] * batch.image_sizes[:, 1]  # [n_images]
    return Workload(cfg.data.seq_length, cfg.data.micro_batch_size, int(tokens.sum()),
                    int(patches.sum()), len(patches), cross, width,
                    len(patches) * int(patches.max()) if len(patches) else 0)
