"""Model FLOPs of one micro-batch, per part of the model and per pipeline stage.

A matmul of an [n, k] input with a [k, m] weight costs 2*n*k*m FLOPs forward; its backward costs
twice that, half for the input gradient and half for the weight gradient (Kaplan et al. 2020,
arXiv 2001.08361; Narayanan et al. 2021, arXiv 2104.04473, appendix). Attention adds 4*s^2*a*d
per sequence forward (scores and their product with the values), counted over the full square as
Megatron-LM and PaLM (Chowdhery et al. 2022, appendix B) count it; the encoder's attention is
block-diagonal, so it is counted per image. A part that does not train skips its weight
gradients; a part before which nothing trains (a frozen encoder) skips its backward entirely.
Recomputation adds forwards to the hardware FLOPs but not to the model FLOPs (MFU's convention).
Cross-attention layers (X/H): queries and MLP over the text positions, keys and values over each
row's own image tokens (padded to the row with the most, kr), and attention as the model computes
it: every row's queries against its kr keys under a mask (4*b*s*kr*h per layer).
"""
from __future__ import annotations

from dataclasses import dataclass

from mmpretrain.config import Config
from mmpretrain.planner.params import ModelParams, Trains, padded_vocab
from mmpretrain.planner.stages import Stage, first_grad_layer, grad_layers
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
        self.trains = Trains.of(cfg)
        self.grad_from = first_grad_layer(cfg, model)

    def vision(self) -> Flops:
        """Patch embedding and encoder layers."""
        v, w = self.cfg.vision, self.work
        per_image = w.patches / max(w.images, 1)
        attn = 4.0 * w.patches * per_image * v.hidden_size * v.num_layers
        params = self.model.vision.total
        return _layer(params, w.patches, attn, self.trains.vision, False)

    def projector(self) -> Flops:
        """The projector over the image tokens."""
        return _layer(self.model.projector.total, self.work.image_tokens, 0.0,
                      self.trains.projector, self.trains.vision)

    def decoder_layers(self, n: int, grads: bool = True) -> Flops:
        """n decoder layers (`grads`: gradients pass through them)."""
        d, w = self.cfg.decoder, self.work
        attn = 4.0 * w.micro_batch * w.seq_length ** 2 * d.hidden_size * n
        return _layer(self.model.layer.total * n, w.tokens, attn, self.trains.decoder, grads)

    def xattn_layers(self, n: int, grads: bool = True) -> Flops:
        """n cross-attention layers: queries and MLP over the text, keys and values over the
        image tokens, dense masked attention of every row over all of them."""
        w, d = self.work, self.cfg.decoder
        kv = 2 * d.hidden_size * d.num_query_groups * (d.hidden_size // d.num_attention_heads)
        q_side = self.model.xattn.total - kv
        attn = 4.0 * w.tokens * w.keys_per_row * d.hidden_size * n
        t = self.trains
        kv_trains, kv_grads = (t.xattn, t.images_need_grads) if grads else (False, False)
        return _layer(q_side * n, w.tokens, attn, t.xattn and grads, grads) + \
            _layer(kv * n, w.micro_batch * w.keys_per_row, 0.0, kv_trains, kv_grads)

    def head(self) -> Flops:
        """The output layer (the embedding lookup costs no FLOPs)."""
        params = self.vocab * self.cfg.decoder.hidden_size
        return _layer(params, self.work.tokens, 0.0, self.trains.decoder,
                      self.grad_from < self.model.num_layers)

    def _layer_counts(self, stage: Stage) -> tuple[int, int, int, int]:
        """(decoder layers with gradients, without; cross-attention layers with, without)."""
        dec = xat = dec_g = xat_g = 0
        for start, n in zip(stage.chunk_first_layer, stage.chunk_layers):
            dec += n
            dec_g += grad_layers(start, n, self.grad_from)
            for i in range(start, start + n):
                if self.model.xattn_before(i):
                    xat += 1
                    xat_g += i >= self.grad_from
        return dec_g, dec - dec_g, xat_g, xat - xat_g

    def stage(self, stage: Stage) -> Flops:
        """A pipeline stage's share: its layers, plus encoder/projector first, head last."""
        dec_g, dec_n, xat_g, xat_n = self._layer_counts(stage)
        out = self.decoder_layers(dec_g, True) + self.decoder_layers(dec_n, False) \
            + self.xattn_layers(xat_g, True) + self.xattn_layers(xat_n, False)
        if stage.first:
            out = out + self.vision() + self.projector()
        if stage.last:
            out = out + self.head()
        return out

    def recompute(self, stage: Stage, mode: str) -> Flops:
        """Extra forward FLOPs recomputation adds on `stage`: the attention core (selective), or
        whole decoder layers with their cross-attention layers (full); only where gradients
        pass (no backward, nothing to recompute)."""
        dec_g, _, xat_g, _ = self._layer_counts(stage)
        if mode == "none" or not dec_g:
            return Flops()
        d, w = self.cfg.decoder, self.work
        attn = 4.0 * w.micro_batch * w.seq_length ** 2 * d.hidden_size * dec_g
        if mode == "selective":
            return Flops(0.0, attn)
        xattn = self.xattn_layers(xat_g, False)  # one more forward of each
        return Flops(2.0 * self.model.layer.total * dec_g * w.tokens, attn) + xattn
