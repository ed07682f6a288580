"""A config's parallel layout checked against a world size, before anything is launched.

`mmpretrain.parallel.layout` holds the checks the training run makes at start (world divisible by
tp*pp, heads and query groups by tp, layers by the pipeline stages, global batch by micro-batch
x dp, the MLP and projector widths by tp, ...); this runs them for a world size given on the
command line.
"""
from __future__ import annotations

from mmpretrain.config import Config, ConfigError


def check(cfg: Config, world: int):
    """The validated `ParallelLayout` of `cfg` on `world` ranks; ConfigError names the setting."""
    from mmpretrain.parallel.layout import ParallelLayout

    if world < 1:
        raise ConfigError(f"world size must be positive, got {world}")
    return ParallelLayout.from_config(cfg, world)
