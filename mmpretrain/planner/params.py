"""Exact parameter counts of the model a Config builds, in total and per rank.

The counts mirror `mmpretrain.model` module by module (a test checks them against an instantiated
model): megatron's local layer spec has no biases and no QK norm, its fused QKV projection holds
`(heads + 2 * groups) * head_dim` rows, the SwiGLU `linear_fc1` holds `2 * ffn` rows; tensor
parallelism splits those matrices (and column-parallel biases) over tp ranks and replicates norms,
row-parallel biases and the encoder's patch embedding. The vocabulary is padded as the model pads it.

Cross-attention layers (designs X and H) are counted by `cross_attention_layer` as
`mmpretrain.model.cross_attention` builds them, Flamingo/Mllama style: a norm, queries from the text
stream, keys and values from the projected image tokens, an output projection, a norm and a SwiGLU
MLP, plus the two tanh gates. One precedes each decoder layer `config.cross_attention_positions`
names (`model.cross_attention_every` and/or `model.cross_attention_layers`); a test pins the counts
of D, X and H to instantiated models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mmpretrain.config import Config, cross_attention_positions


@dataclass(frozen=True)
class Count:
    """Parameters of one part: all of them, and those one tensor-parallel rank holds."""

    total: int
    per_rank: int

    def __add__(self, other: Count) -> Count:
        return Count(self.total + other.total, self.per_rank + other.per_rank)

    def __mul__(self, k: int) -> Count:
        return Count(self.total * k, self.per_rank * k)


ZERO = Count(0, 0)


def padded_vocab(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """The vocabulary rounded up as `mmpretrain.model.build.padded_vocab_size` rounds it."""
    unit = math.lcm(multiple, tp)
    return (vocab_size + unit - 1) // unit * unit


def split(n: int, tp: int) -> Count:
    """A tensor split evenly over the tensor-parallel ranks."""
    return Count(n, n // tp)


def replicated(n: int) -> Count:
    """A tensor every tensor-parallel rank holds whole."""
    return Count(n, n)


def transformer_layer(h: int, heads: int, groups: int, ffn: int, tp: int) -> Count:
    """A pre-norm RMSNorm / GQA self-attention / SwiGLU layer without biases."""
    d = h // heads
    attention = split(h * (heads + 2 * groups) * d, tp) + split(heads * d * h, tp)
    mlp = split(h * 2 * ffn, tp) + split(ffn * h, tp)
    return replicated(h) * 2 + attention + mlp


def cross_attention_layer(h: int, heads: int, groups: int, ffn: int, kv_in: int, tp: int) -> Count:
    """A gated cross-attention layer (X/H): norm, q from text, k/v from `kv_in`-wide image tokens,
    per-head q/k norms, output projection, norm, SwiGLU MLP, and two scalar tanh gates."""
    d = h // heads
    attention = split(h * heads * d, tp) + split(kv_in * 2 * groups * d, tp) + split(heads * d * h, tp)
    mlp = split(h * 2 * ffn, tp) + split(ffn * h, tp)
    return replicated(h) * 2 + replicated(d) * 2 + attention + mlp + replicated(2)


def vision_encoder(cfg: Config) -> Count:
    """Patch embedding, pre-norm and the encoder's layers (no final norm, Pixtral)."""
    v, tp = cfg.vision, cfg.parallel.tp
    embed = replicated(3 * v.patch_size ** 2 * v.hidden_size) + replicated(v.hidden_size)
    layer = transformer_layer(v.hidden_size, v.num_attention_heads, v.num_attention_heads,
                              v.ffn_hidden_size, tp)
    return embed + layer * v.num_layers


def projector(cfg: Config) -> Count:
    """Two-layer MLP with biases: column-parallel in (bias split), row-parallel out (bias whole)."""
    tp, m = cfg.parallel.tp, cfg.projector.merge
    inner = cfg.projector.hidden_size or cfg.decoder.hidden_size
    first = split(cfg.vision.hidden_size * m * m * inner, tp) + split(inner, tp)
    second = split(inner * cfg.decoder.hidden_size, tp) + replicated(cfg.decoder.hidden_size)
    return first + second


def decoder_layer(cfg: Config) -> Count:
    """One decoder layer."""
    d = cfg.decoder
    return transformer_layer(d.hidden_size, d.num_attention_heads, d.num_query_groups,
                             d.ffn_hidden_size, cfg.parallel.tp)


def xattn_layer(cfg: Config) -> Count:
    """One cross-attention layer of X/H; keys and values read the projected (decoder-wide) images."""
    d = cfg.decoder
    return cross_attention_layer(d.hidden_size, d.num_attention_heads, d.num_query_groups,
                                 d.ffn_hidden_size, d.hidden_size, cfg.parallel.tp)


def xattn_positions(cfg: Config) -> tuple[int, ...]:
    """1-based decoder layers a cross-attention layer precedes (X/H); () for D."""
    if cfg.model.design == "d":
        return ()
    return tuple(cross_attention_positions(cfg))


@dataclass(frozen=True)
class Trains:
    """Which parts train, as `mmpretrain.model.build` sets requires_grad: the freeze flags, and
    `model.train_only_cross_attention` (encoder and decoder frozen, cross-attention layers trained;
    the projector follows projector.freeze). Cross-attention layers belong to the decoder, so
    decoder.freeze alone freezes them."""

    vision: bool
    projector: bool
    decoder: bool
    xattn: bool

    @classmethod
    def of(cls, cfg: Config) -> Trains:
        """The parts of `cfg`'s model that train."""
        only = cfg.model.train_only_cross_attention
        return cls(vision=not (cfg.vision.freeze or only), projector=not cfg.projector.freeze,
                   decoder=not (cfg.decoder.freeze or only), xattn=only or not cfg.decoder.freeze)

    @property
    def images_need_grads(self) -> bool:
        """Whether gradients flow back into the projected image tokens."""
        return self.vision or self.projector


def embedding(cfg: Config, vocab_size: int) -> Count:
    """Vocab-parallel input embedding (untied from the output layer)."""
    return split(padded_vocab(vocab_size, cfg.parallel.tp) * cfg.decoder.hidden_size, cfg.parallel.tp)


@dataclass(frozen=True)
class ModelParams:
    """The parts of the model, each counted once."""

    vision: Count
    projector: Count
    embedding: Count
    layer: Count
    xattn: Count
    final_norm: Count
    output: Count
    num_layers: int
    positions: tuple[int, ...] = ()
    """1-based decoder layers preceded by a cross-attention layer (X/H)."""

    def xattn_layers(self, first: int, count: int) -> int:
        """Cross-attention layers before the decoder layers of 0-based indices first ..
        first+count-1 (the one before 1-based layer L belongs with layer L)."""
        return sum(1 for p in self.positions if first < p <= first + count)

    def xattn_before(self, layer: int) -> bool:
        """Whether a cross-attention layer precedes the decoder layer of 0-based index `layer`."""
        return layer + 1 in self.positions

    @property
    def decoder(self) -> Count:
        """The decoder with its embeddings (and X/H cross-attention layers)."""
        n_x = len(self.positions)
        return self.embedding + self.layer * self.num_layers + self.xattn * n_x + self.final_norm \
            + self.output

    @property
    def total(self) -> int:
        """All parameters of the model."""
        return (self.vision + self.projector + self.decoder).total


def count(cfg: Config, vocab_size: int) -> ModelParams:
    """Count the model of `cfg` with a tokenizer of `vocab_size` entries."""
    h = cfg.decoder.hidden_size
    emb = embedding(cfg, vocab_size)
    return ModelParams(vision_encoder(cfg), projector(cfg), emb, decoder_layer(cfg),
                       xattn_layer(cfg), replicated(h), emb, cfg.decoder.num_layers,
                       xattn_positions(cfg))
