"""How the model splits over pipeline stages, and what each stage's ranks hold.

As in `mmpretrain.model.build`: the vision encoder, the projector and the embedding sit on the
first stage, the final norm and the output layer on the last; the decoder layers are spread evenly,
or `parallel.first_stage_decoder_layers` go to the first stage and the rest evenly over the others
(megatron's `num_layers_in_first_pipeline_stage`). With `vpp` virtual stages each stage's layers
split again into vpp equal chunks, placed round-robin: the model runs chunk 0 of every stage, then
chunk 1 of every stage, and so on (the interleaved schedule).
"""
from __future__ import annotations

from dataclasses import dataclass

from mmpretrain.config import Config
from mmpretrain.planner.params import ZERO, Count, ModelParams, Trains


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its decoder layers (per virtual chunk) and its extra parts."""

    index: int
    chunk_layers: tuple[int, ...]  # decoder layers of each virtual chunk, in chunk order
    chunk_first_layer: tuple[int, ...]  # global index of each chunk's first decoder layer
    first: bool
    last: bool

    @property
    def layers(self) -> int:
        """Decoder layers on this stage."""
        return sum(self.chunk_layers)


def stage_layer_counts(num_layers: int, pp: int, first: int | None) -> list[int]:
    """Decoder layers per pipeline stage."""
    if pp == 1:
        return [num_layers]
    if first is None:
        return [num_layers // pp] * pp
    return [first] + [(num_layers - first) // (pp - 1)] * (pp - 1)


def stages(num_layers: int, pp: int, vpp: int | None, first: int | None = None) -> list[Stage]:
    """The stages of a layout. Virtual chunk c of stage i follows chunk c of stage i-1 and
    precedes chunk c of stage i+1; chunk c+1 of stage 0 follows chunk c of the last stage."""
    v = vpp or 1
    per_stage = stage_layer_counts(num_layers, pp, first)
    per_chunk = [[n // v] * v for n in per_stage]
    starts = [[0] * v for _ in range(pp)]
    at = 0
    for c in range(v):
        for i in range(pp):
            starts[i][c] = at
            at += per_chunk[i][c]
    return [Stage(i, tuple(per_chunk[i]), tuple(starts[i]), i == 0, i == pp - 1) for i in range(pp)]


def stages_of(cfg: Config) -> list[Stage]:
    """The stages of `cfg`'s layout."""
    p = cfg.parallel
    return stages(cfg.decoder.num_layers, p.pp, p.vpp, getattr(p, "first_stage_decoder_layers", None))


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one rank of a stage, by whether they train."""

    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        """All parameters the rank holds."""
        return self.trainable + self.frozen


def chunk_xattn_layers(model: ModelParams, stage: Stage) -> list[int]:
    """Cross-attention layers (X/H) in each virtual chunk of `stage`."""
    return [model.xattn_layers(f, n) for f, n in zip(stage.chunk_first_layer, stage.chunk_layers)]


def first_grad_layer(cfg: Config, model: ModelParams) -> int:
    """0-based index of the first decoder layer that gradients pass through (num_layers: none).
    From the first layer when the decoder trains or trained image embeddings sit in the token
    stream (D, H's thumbnails); else from the first cross-attention layer when it trains or reads
    trained image tokens (X; H with the projector and encoder frozen)."""
    t = Trains.of(cfg)
    if t.decoder or (cfg.model.design in ("d", "h") and t.images_need_grads):
        return 0
    if model.positions and (t.xattn or t.images_need_grads):
        return min(model.positions) - 1
    return model.num_layers


def grad_layers(first: int, count: int, start: int) -> int:
    """How many of the decoder layers first .. first+count-1 gradients pass through (those from
    `start` on)."""
    return max(0, first + count - max(first, start))


def stage_params(cfg: Config, model: ModelParams, stage: Stage) -> StageParams:
    """Per-rank parameters of `stage`, split by what trains (`params.Trains`)."""
    t = Trains.of(cfg)
    parts: list[tuple[Count, bool]] = []
    if stage.first:
        parts += [(model.vision, t.vision), (model.projector, t.projector),
                  (model.embedding, t.decoder)]
    n_x = sum(chunk_xattn_layers(model, stage))
    parts += [(model.layer * stage.layers, t.decoder), (model.xattn * n_x, t.xattn)]
    if stage.last:
        parts += [(model.final_norm + model.output, t.decoder)]
    trainable = sum((c for c, trains in parts if trains), ZERO).per_rank
    frozen = sum((c for c, trains in parts if not trains), ZERO).per_rank
    return StageParams(trainable, frozen)
