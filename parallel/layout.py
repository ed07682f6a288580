"""The parallel layout: one validated object holding tp, pp, vpp, dp and their options.

It is checked against the model config before any process group exists, so a bad layout fails at
start with one message naming the setting, not inside megatron-core on some rank.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from mmpretrain.config import Config, ConfigError


@dataclass(frozen=True)
class ParallelLayout:
    """Parallel sizes for a world of `world_size` ranks; dp is derived."""

    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    first_stage_decoder_layers: int | None = None

    @property
    def dp(self) -> int:
        """Data-parallel size."""
        return self.world_size // (self.tp * self.pp)

    @property
    def model_chunks(self) -> int:
        """Model chunks per rank (virtual pipeline stages)."""
        return self.vpp or 1

    @classmethod
    def from_config(cls, cfg: Config, world_size: int | None = None) -> ParallelLayout:
        """The layout of `cfg` for `world_size` ranks (default: $WORLD_SIZE or 1), validated."""
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        layout = cls(world_size, **dataclasses.asdict(cfg.parallel))  # the same field names
        validate(layout, cfg)
        return layout


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(layout: ParallelLayout, cfg: Config) -> None:
    """Raise ConfigError for the first violation, naming the setting."""
    tp, pp, vpp, world = layout.tp, layout.pp, layout.vpp, layout.world_size
    _check(tp >= 1 and pp >= 1, "parallel.tp and parallel.pp must be at least 1")
    _check(world % (tp * pp) == 0,
           f"world size {world} is not divisible by parallel.tp x parallel.pp = {tp} x {pp}")
    d, v = cfg.decoder, cfg.vision
    for key, n in (("decoder.num_attention_heads", d.num_attention_heads),
                   ("decoder.num_query_groups", d.num_query_groups),
                   ("vision.num_attention_heads", v.num_attention_heads)):
        _check(n % tp == 0, f"{key} = {n} is not divisible by parallel.tp = {tp}")
    projector_hidden = cfg.projector.hidden_size or d.hidden_size
    for key, n in (("decoder.ffn_hidden_size", d.ffn_hidden_size),
                   ("vision.ffn_hidden_size", v.ffn_hidden_size),
                   ("projector.hidden_size (default: decoder.hidden_size)", projector_hidden)):
        _check(n % tp == 0, f"{key} = {n} is not divisible by parallel.tp = {tp}: its linear "
                            f"layers are split in {tp} column shards")
    _check(not layout.sequence_parallel or tp > 1,
           "parallel.sequence_parallel needs parallel.tp > 1")
    _check(not layout.sequence_parallel or cfg.data.seq_length % tp == 0,
           f"data.seq_length = {cfg.data.seq_length} is not divisible by parallel.tp = {tp}, as "
           f"parallel.sequence_parallel splits each sequence over the tensor-parallel ranks")
    _check(vpp is None or (vpp > 1 and pp > 1),
           "parallel.vpp (virtual stages) needs parallel.pp > 1 and vpp > 1")
    _check_layer_split(layout, d.num_layers)
    micro = cfg.data.micro_batch_size * layout.dp
    _check(cfg.train.global_batch_size % micro == 0,
           f"train.global_batch_size {cfg.train.global_batch_size} is not divisible by "
           f"data.micro_batch_size x data-parallel size = {cfg.data.micro_batch_size} x {layout.dp}")
    n_micro = cfg.train.global_batch_size // micro
    _check(vpp is None or n_micro % pp == 0,
           f"the interleaved schedule needs micro-batches per step ({n_micro}) divisible by "
           f"parallel.pp = {pp}")


def _check_layer_split(layout: ParallelLayout, num_layers: int) -> None:
    pp, chunks, first = layout.pp, layout.model_chunks, layout.first_stage_decoder_layers
    if first is None:
        _check(num_layers % (pp * chunks) == 0,
               f"decoder.num_layers = {num_layers} is not divisible across {pp} pipeline stages x "
               f"{chunks} virtual stages")
        return
    _check(pp > 1, "parallel.first_stage_decoder_layers needs parallel.pp > 1")
    rest = num_layers - first
    _check(1 <= first and rest >= pp - 1 and rest % (pp - 1) == 0,
           f"parallel.first_stage_decoder_layers = {first} leaves {rest} of decoder.num_layers = "
           f"{num_layers} for {pp - 1} stages: each needs the same number, at least one")
    _check(first % chunks == 0 and (rest // (pp - 1)) % chunks == 0,
           f"the decoder layers of each stage ({first} first, {rest // (pp - 1)} others) must be "
           f"divisible by the {chunks} virtual stages")
