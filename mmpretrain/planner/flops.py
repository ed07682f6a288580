"""Model FLOPs of one micro-batch, per part of the model and per pipeline stage.

A matmul of an [n, k] input with a [k, m] weight costs 2*n*k*m FLOPs forward; its backward costs
twice that, half for the input gradient and half for the weight gradient (Kaplan et al. 2020,
arXiv 2001.08361; Narayanan et al. 2021, arXiv 2104.04473, appendix). Attention adds 4*s^2*a*d
per sequence forward (scores and their product with the values), counted over the full square as
Megatron-LM and PaLM (Chowdhery et al. 2022, appendix B) count it; the encoder's attention is
block-diagonal, so it is counted per image. A part that does not train skips its weight
gradients; a part before which nothing trains (a frozen encoder) skips its backward entirely.
Recomputation adds forwards to the hardware FLOPs but not to the model FLOPs (MFU's convention).
Cross-attention layers (X/H): text queries over the image tokens of the micro-batch's rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmpretrain.config import Config
from mmpretrain.planner.params import ModelParams, padded_vocab
from mmpretrain.planner.stages import Stage, chunk_xattn_layers
from mmpretrain.planner.workload import Workload


@dataclass(frozen=True)
class Flops:
    """FLOPs of one micro-batch: matmuls with weights (which FP8 speeds up) and attention."""

    linear: float = 0.0
    attention: float = 0.0

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.linear + other.linear, self.attention + other.attention)

    def __mul__(self, k: float) -> Flops:
        return Flops(self.linear * k, self.attention * k)

    @property
    def total(self) -> float:
        """All FLOPs."""
        return self.linear + self.attention


def passes(trains: bool, grads_flow: bool) -> tuple[float, float]:
    """Multipliers of the forward FLOPs for (weight matmuls, attention) in forward+backward."""
    if trains:
        return 3.0, 3.0
    return (2.0, 3.0) if grads_flow else (1.0, 1.0)


def _layer(params: int, tokens: int, attn: float, trains: bool, grads_flow: bool) -> Flops:
    lin, att = passes(trains, grads_flow)
    return Flops(2.0 * params * tokens * lin, attn * att)


class ModelFlops:
    """Forward+backward FLOPs of the model's parts for one micro-batch."""

    def __init__(self, cfg: Config, model: ModelParams, work: Workload, vocab_size: int):
        self.cfg, self.model, self.work = cfg, model, work
        self.vocab = padded_vocab(vocab_size, cfg.parallel.tp)
        self.vision_trains = not cfg.vision.freeze
        self.projector_grads = self.vision_trains or not cfg.projector.freeze
        self.decoder_trains = not cfg.decoder.freeze

    def vision(self) -> Flops:
        """Patch embedding and encoder layers."""
        v, w = self.cfg.vision, self.work
        per_image = w.patches / max(w.images, 1)
        attn = 4.0 * w.patches * per_image * v.hidden_size * v.num_layers
        params = self.model.vision.total
        return _layer(params, w.patches, attn, self.vision_trains, False)

    def projector(self) -> Flops:
        """The projector over the image tokens."""
        return _layer(self.model.projector.total, self.work.image_tokens, 0.0,
                      not self.cfg.projector.freeze, self.vision_trains)

    def decoder_layers(self, n: int) -> Flops:
        """n decoder layers."""
        d, w = self.cfg.decoder, self.work
        attn = 4.0 * w.micro_batch * w.seq_length ** 2 * d.hidden_size * n
        return _layer(self.model.layer.total * n, w.tokens, attn, self.decoder_trains,
                      self.projector_grads)

    def xattn_layers(self, n: int) -> Flops:
        """n cross-attention layers (always trained): text queries, image keys and values."""
        w, d = self.work, self.cfg.decoder
        kv = 2 * d.hidden_size * d.num_query_groups * (d.hidden_size // d.num_attention_heads)
        q_side = self.model.xattn.total - kv
        attn = 4.0 * w.seq_length * w.image_tokens * d.hidden_size * n
        return _layer(q_side * n, w.tokens, attn, True, True) + \
            _layer(kv * n, w.image_tokens, 0.0, True, True)

    def head(self) -> Flops:
        """The output layer (the embedding lookup costs no FLOPs)."""
        params = self.vocab * self.cfg.decoder.hidden_size
        return _layer(params, self.work.tokens, 0.0, self.decoder_trains, self.projector_grads)

    def stage(self, stage: Stage) -> Flops:
        """A pipeline stage's share: its layers, plus encoder/projector first, head last."""
        out = self.decoder_layers(stage.layers) + self.xattn_layers(
            sum(chunk_xattn_layers(self.model, stage)))
        if stage.first:
            out = out + self.vision() + self.projector()
        if stage.last:
            out = out + self.head()
        return out

    def recompute(self, stage: Stage, mode: str) -> Flops:
        """Extra forward FLOPs recomputation adds on `stage`: the attention core (selective), or
        whole decoder layers (full)."""
        if mode == "none" or not self.projector_grads and not self.decoder_trains:
            return Flops()
        d, w, n = self.cfg.decoder, self.work, stage.layers
        attn = 4.0 * w.micro_batch * w.seq_length ** 2 * d.hidden_size * n
        if mode == "selective":
            return Flops(0.0, attn)
        return Flops(2.0 * self.model.layer.total * n * w.tokens, attn)
