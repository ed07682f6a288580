"""What one micro-batch holds, and the numerics the planner assumes.

The decoder sees `micro_batch` packed rows of `seq_length` tokens. A fraction of those positions
are image tokens; each stands for merge^2 encoder patches, and all patches of the micro-batch form
one encoder stream. Memory is planned for the worst case by default (every position an image token:
the packer can fill a row with images, up to `data.max_patches` when set), images at their largest
(the token budget, or one tile).
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
    """Decoder positions holding an image embedding, over the micro-batch."""
    patches: int
    """Length of the encoder stream (image_tokens * merge^2)."""
    images: int
    """Images in the micro-batch (the encoder's attention is block-diagonal over them)."""

    @property
    def tokens(self) -> int:
        """Decoder positions of the micro-batch."""
        return self.seq_length * self.micro_batch

    @classmethod
    def from_config(cls, cfg: Config, image_fraction: float = 1.0) -> Workload:
        """A micro-batch whose positions are `image_fraction` image tokens, in full-size images."""
        if not 0.0 <= image_fraction <= 1.0:
            raise ValueError(f"image fraction must be in [0, 1], got {image_fraction}")
        d, m = cfg.data, cfg.projector.merge
        s, b = d.seq_length, d.micro_batch_size
        image_tokens = int(image_fraction * s * b)
        patches = image_tokens * m * m
        if getattr(d, "max_patches", 0):  # the packer's cap on one micro-batch's encoder stream
            patches = min(patches, d.max_patches)
            image_tokens = patches // (m * m)
        images = math.ceil(patches / patches_per_image(cfg)) if patches else 0
        return cls(s, b, image_tokens, patches, images)


def patches_per_image(cfg: Config) -> int:
    """Patches of the largest image: a tile under NVLM tiling, else the token budget."""
    d = cfg.data
    if getattr(d, "resize", "native") == "tiles":
        return (d.tile_size // cfg.vision.patch_size) ** 2
    return d.image_token_budget


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
