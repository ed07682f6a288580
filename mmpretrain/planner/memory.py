"""Memory per GPU of each pipeline stage: model states, activations in flight, working memory.

Model states follow megatron-core's accounting (docs of the distributed optimizer;
Rajbhandari et al. 2020, ZeRO, arXiv 1910.02054): bf16 parameters (2 bytes), fp32 gradient
buffers (4 bytes: `grad_reduce_in_fp32`), and Adam's fp32 main parameters and two moments
(12 bytes) for trainable parameters, divided by the data-parallel size under the distributed
optimizer. With fp32 parameters there is no main copy (8 bytes of Adam). Frozen parameters hold
only their weights. FP8 adds the Transformer Engine's cached FP8 weight and its transpose
(2 bytes per parameter). The local spec keeps megatron's global buffer for attention scores.

Activations come from `activations.layer_memory` per layer and micro-batch, summed per model chunk
and multiplied by the micro-batches in flight as `schedule.inflight_peak` finds them. The peak adds
working memory: on the last stage the logits and the loss (the vocab-parallel cross entropy keeps
an fp32 softmax of [s, b, V/t]), elsewhere the largest layer's backward.

X/H chunks also hold the image context per micro-batch: the cross-attended image tokens and the
cross-attention mask (shared by the chunk's cross-attention layers), and under pipeline parallelism
the context rows every stage receives with the hidden states and sends on (padded to
data.max_patches / merge^2 tokens; `workload.context_capacity`).
"""
from __future__ import annotations

from dataclasses import dataclass

from mmpretrain.config import Config
from mmpretrain.planner.activations import (
    FP32,
    LayerMemory,
    Shape,
    cross_attention_memory,
    layer_memory,
    norm_kept,
    score_elements,
)
from mmpretrain.planner.params import ModelParams, Trains, padded_vocab
from mmpretrain.planner.schedule import inflight_peak
from mmpretrain.planner.stages import Stage, first_grad_layer, stage_params
from mmpretrain.planner.workload import Numerics, Workload, context_capacity


@dataclass(frozen=True)
class StageMemory:
    """Bytes per GPU of one pipeline stage."""

    weights: float
    grads: float
    optimizer: float
    buffers: float
    activations: float
    working: float

    @property
    def states(self) -> float:
        """Weights, gradients, optimizer states and fixed buffers."""
        return self.weights + self.grads + self.optimizer + self.buffers

    @property
    def total(self) -> float:
        """The stage's peak."""
        return self.states + self.activations + self.working


def decoder_shape(cfg: Config) -> Shape:
    """The decoder stack's shape."""
    d = cfg.decoder
    return Shape(d.hidden_size, d.num_attention_heads, d.num_query_groups, d.ffn_hidden_size)


def vision_shape(cfg: Config) -> Shape:
    """The encoder stack's shape."""
    v = cfg.vision
    return Shape(v.hidden_size, v.num_attention_heads, v.num_attention_heads, v.ffn_hidden_size)


def states(cfg: Config, model: ModelParams, stage: Stage, dp: int, num: Numerics) -> tuple:
    """(weights, grads, optimizer) bytes per rank of `stage`."""
    held = stage_params(cfg, model, stage)
    adam = (12 if num.param_bytes == 2 else 8) * held.trainable
    if cfg.parallel.distributed_optimizer:
        adam /= dp
    fp8_cache = 2 * held.total if num.fp8 else 0
    return held.total * num.param_bytes + fp8_cache, held.trainable * FP32, adam


class ActivationModel:
    """Activation bytes of the parts of the model for one micro-batch, on one rank."""

    def __init__(self, cfg: Config, work: Workload, num: Numerics, vocab_size: int):
        self.cfg, self.work, self.num = cfg, work, num
        self.tp, self.sp = cfg.parallel.tp, cfg.parallel.sequence_parallel
        self.vocab = padded_vocab(vocab_size, self.tp)
        self.trains = Trains.of(cfg)
        self.vision_trains = self.trains.vision
        self.projector_grads = self.trains.images_need_grads

    def decoder_layer(self, grads: bool = True) -> LayerMemory:
        """One decoder layer; `grads`: whether gradients pass through it (nothing kept if not)."""
        w = self.work
        return layer_memory(decoder_shape(self.cfg), w.tokens, (w.seq_length,) * w.micro_batch,
                            self.tp, self.sp, self.num, self.trains.decoder, grads)

    def xattn_layer(self, grads: bool = True) -> LayerMemory:
        """One cross-attention layer of X/H."""
        w = self.work
        return cross_attention_memory(decoder_shape(self.cfg), w.tokens, w.micro_batch,
                                      w.keys_per_row, self.tp, self.sp, self.num, self.trains.xattn,
                                      grads)

    def context(self, first: bool, last: bool, xattn_grads: bool) -> float:
        """X/H, per chunk and micro-batch: each row's keys [kr, b, h] gathered from the context
        and the boolean mask [b, 1, s, kr], which the chunk's cross-attention layers share
        (`xattn_grads`: it has some that gradients pass through); on a chunk after the first the
        context rows received with the hidden states (held for the backward), on a chunk before
        the last the context rows of its output."""
        if self.cfg.model.design == "d":
            return 0.0
        w, b, h = self.work, self.num.param_bytes, self.cfg.decoder.hidden_size
        capacity = context_capacity(self.cfg)
        held = w.tokens * w.keys_per_row * (1 + h * b / w.seq_length) if xattn_grads else 0.0
        if not first:
            held += capacity * h * b
        if not last:
            held += capacity * h * b
        return held

    def vision_layer(self) -> LayerMemory:
        """One encoder layer over the packed image stream (no sequence parallelism there)."""
        n = self.work.patches
        return layer_memory(vision_shape(self.cfg), n, (), self.tp, False, self.num,
                            self.vision_trains, self.vision_trains, packed=self.work.padded_patches)

    def encoder_input(self) -> LayerMemory:
        """Patches, the pre-norm and the encoder's boolean mask (local spec), if the encoder trains."""
        w, v = self.work, self.cfg.vision
        if not self.vision_trains:
            return LayerMemory(0.0, 0.0)
        kept = w.patches * 3 * v.patch_size ** 2 * self.num.param_bytes
        kept += norm_kept(w.patches * v.hidden_size, w.patches, self.num)
        return LayerMemory(kept, 0.0)

    def projector(self) -> LayerMemory:
        """The GELU's input, and both linear inputs when the projector trains."""
        if not self.projector_grads:
            return LayerMemory(0.0, 0.0)
        w, b = self.work, self.num.param_bytes
        inner = self.cfg.projector.hidden_size or self.cfg.decoder.hidden_size
        trains = self.trains.projector
        kept = w.image_tokens * inner / self.tp * b * (2 if trains else 1)
        kept += w.image_tokens * self.cfg.vision.hidden_size * self.cfg.projector.merge ** 2 * b * trains
        return LayerMemory(kept, 0.0)

    def chunk_extra(self) -> float:
        """Per chunk and micro-batch: the decoder mask (local spec) and the chunk's output."""
        w = self.work
        mask = w.micro_batch * w.seq_length ** 2 if self.num.spec == "local" else 0.0
        shard = self.tp if self.sp else 1
        return mask + w.tokens * self.cfg.decoder.hidden_size / shard * self.num.param_bytes

    def head(self, grads: bool = True) -> LayerMemory:
        """The final norm, output layer and cross entropy."""
        w, b = self.work, self.num.param_bytes
        shard = self.tp if self.sp else 1
        h = self.cfg.decoder.hidden_size
        logits = w.tokens * self.vocab / self.tp
        logits_copy = logits * b if b != FP32 else 0.0  # next to the fp32 copy
        if not grads:
            return LayerMemory(0.0, 0.0, logits_copy + logits * FP32)
        trains = self.trains.decoder
        kept = norm_kept(w.tokens * h / shard, w.tokens / shard, self.num, trains)
        kept += w.tokens * h / shard * self.num.linear_input_bytes * trains + logits * FP32
        # The fp32 logits become the softmax in place; in the backward the gradient of the
        # hidden states (or of the bf16 logits) appears while the softmax is still held.
        working = max(logits_copy, w.tokens * h / shard * b)
        return LayerMemory(kept, working, logits_copy)

    def dense_buffer(self) -> float:
        """megatron's global score buffer (local spec): the decoder's [b*a/t, s, s] (the encoder's
        packed attention does not use it)."""
        if self.num.spec != "local":
            return 0.0
        w, c = self.work, self.cfg
        dec = score_elements(c.decoder.num_attention_heads / self.tp, (w.seq_length,) * w.micro_batch)
        return dec * self.num.param_bytes


def peak_working(parts: list[LayerMemory]) -> float:
    """Transient memory of one chunk's micro-batch on top of the stage's peak, its parts given in
    forward order. A part's forward transient sits on what the parts before it keep (the parts
    after it have kept nothing yet); its backward transient on what the parts after it have not
    yet released (the backward runs in reverse)."""
    worst, later = 0.0, sum(p.saved for p in parts)
    for part in parts:
        later -= part.saved
        worst = max(worst, part.forward - later - part.saved)
    freed = 0.0
    for part in reversed(parts):
        worst = max(worst, part.working - freed)
        freed += part.saved
    return worst


def chunk_parts(acts: ActivationModel, model: ModelParams, first_layer: int, n_layers: int,
                first: bool, last: bool, grad_from: int) -> list[LayerMemory]:
    """A chunk's parts in forward order: encoder layers and projector, decoder layers (each
    preceded by its cross-attention layer, if any), head. `grad_from`: the first decoder layer
    gradients pass through (`stages.first_grad_layer`)."""
    parts: list[LayerMemory] = []
    if first:
        parts += [acts.encoder_input(), *[acts.vision_layer()] * acts.cfg.vision.num_layers,
                  acts.projector()]
    for i in range(first_layer, first_layer + n_layers):
        if model.xattn_before(i):
            parts.append(acts.xattn_layer(i >= grad_from))
        parts.append(acts.decoder_layer(i >= grad_from))
    if last:
        parts.append(acts.head(grad_from < model.num_layers))
    return parts


def stage_memory(cfg: Config, model: ModelParams, stage: Stage, acts: ActivationModel, dp: int,
                 n_micro: int) -> StageMemory:
    """Peak bytes per GPU of `stage` with `n_micro` micro-batches per step."""
    p, v = cfg.parallel.pp, len(stage.chunk_layers)
    chunk_bytes, working = [], 0.0
    grad_from = first_grad_layer(cfg, model)
    for c, (start, n_layers) in enumerate(zip(stage.chunk_first_layer, stage.chunk_layers)):
        first, last = stage.first and c == 0, stage.last and c == v - 1
        parts = chunk_parts(acts, model, start, n_layers, first, last, grad_from)
        xattn_grads = any(model.xattn_before(i) and i >= grad_from
                          for i in range(start, start + n_layers))
        chunk_bytes.append(sum(part.saved for part in parts) + acts.chunk_extra()
                           + acts.context(first, last, xattn_grads))
        working = max(working, peak_working(parts))
    held = inflight_peak(p, v, n_micro, stage.index, chunk_bytes)
    weights, grads, adam = states(cfg, model, stage, dp, acts.num)
    return StageMemory(weights, grads, adam, acts.dense_buffer(), held, working)
