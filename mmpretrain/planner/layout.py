"""A config's parallel layout checked against a world size, before anything is launched.

`mmpretrain.parallel.layout` holds the checks the training run makes at start (world divisible by
tp*pp, heads and query groups by tp, layers by the pipeline stages, global batch by micro-batch
x dp, ...); this adds the sizes tensor parallelism splits that megatron-core would otherwise
assert on deep inside a rank: the MLP widths and the projector's inner width.
"""
from __future__ import annotations

from mmpretrain.config import Config, ConfigError


def check(cfg: Config, world: int):
    """The validated `ParallelLayout` of `cfg` on `world` ranks; ConfigError names the setting."""
    from mmpretrain.parallel.layout import ParallelLayout

    if world < 1:
        raise ConfigError(f"world size must be positive, got {world}")
    layout = ParallelLayout.from_config(cfg, world)
    tp = cfg.parallel.tp
    inner = cfg.projector.hidden_size or cfg.decoder.hidden_size
    for key, n in (("decoder.ffn_hidden_size", cfg.decoder.ffn_hidden_size),
                   ("vision.ffn_hidden_size", cfg.vision.ffn_hidden_size),
                   ("projector.hidden_size", inner)):
        if n % tp:
            raise ConfigError(f"{key} = {n} is not divisible by parallel.tp = {tp}")
    return layout
