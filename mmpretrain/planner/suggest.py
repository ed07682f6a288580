"""Layouts that fit: a small search over tp, pp, virtual stages and recomputation.

Sequence parallelism goes with tp > 1 and the distributed optimizer is always on (both only save
memory); a pipeline's first stage, which also runs the vision encoder, gets fewer decoder layers
where that is faster; the micro-batch, precision and freezing stay as configured. Candidates that pass the
layout checks and fit are ranked by predicted step time.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from mmpretrain.config import Config, ConfigError, validate
from mmpretrain.planner.layout import check
from mmpretrain.planner.plan import Plan

TP = (1, 2, 4, 8)
VPP = (None, 2, 4, 5)
RECOMPUTE = ("none", "selective", "full")


def first_stage_splits(layers: int, pp: int, chunks: int) -> list[int]:
    """Decoder layers the first of `pp` stages may take when the others take equal shares, each
    stage's divisible by its `chunks` virtual stages (parallel/layout.py's rule)."""
    if pp == 1:
        return []
    return [f for f in range(chunks, layers + 1, chunks) if layers - f >= pp - 1
            and (layers - f) % (pp - 1) == 0 and ((layers - f) // (pp - 1)) % chunks == 0]


def stage_layouts(layers: int, n: int):
    """(pp, vpp, first_stage_decoder_layers) to try with `n` GPUs per tensor-parallel rank: every
    pipeline size that divides n, up to one layer per stage; an even split where the layers
    allow one, else the uneven split nearest to it (pp = 3 or 6 of 80 layers)."""
    for pp in (p for p in range(1, min(n, layers) + 1) if n % p == 0):
        for vpp in (v for v in VPP if v is None or pp > 1):
            chunks = vpp or 1
            if layers % (pp * chunks) == 0:
                yield pp, vpp, None
            elif splits := first_stage_splits(layers, pp, chunks):
                yield pp, vpp, min(splits, key=lambda f: abs(f - layers / pp))


def candidates(cfg: Config, world: int, gpus_per_node: int):
    """Configs of the other layouts to try (tensor parallelism stays inside a node)."""
    for tp in (t for t in TP if t <= gpus_per_node and world % t == 0):
        for pp, vpp, first in stage_layouts(cfg.decoder.num_layers, world // tp):
            for recompute in RECOMPUTE:
                par = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, vpp=vpp,
                                          sequence_parallel=tp > 1, distributed_optimizer=True,
                                          first_stage_decoder_layers=first)
                train = dataclasses.replace(cfg.train, recompute=recompute)
                yield dataclasses.replace(cfg, parallel=par, train=train)


def balanced_first_stage(cfg: Config, plan: Plan) -> int | None:
    """Decoder layers for the first pipeline stage that make it as fast as the others, which lack
    the vision encoder: f * tau + E = (L - f) / (p - 1) * tau, with tau the time of one decoder
    layer and E the encoder's, rounded to a split the layout accepts; None without pipelining."""
    p, v, layers = cfg.parallel.pp, cfg.parallel.vpp or 1, cfg.decoder.num_layers
    if p == 1:
        return None
    first, other = plan.stages[0], plan.stages[1]
    tau = other.seconds / other.layers
    encoder = first.seconds - first.layers * tau
    best = (layers * tau - (p - 1) * encoder) / (p * tau)
    valid = first_stage_splits(layers, p, v)
    return min(valid, key=lambda f: abs(f - best)) if valid else None


def balanced(cfg: Config, plan: Plan, plan_of: Callable[[Config], Plan]) -> tuple[Config, Plan] | None:
    """`cfg` with the balanced first stage (`balanced_first_stage`) and its plan; None when that
    is the split already or the layout checks refuse it."""
    first = balanced_first_stage(cfg, plan)
    if first is None or first == getattr(cfg.parallel, "first_stage_decoder_layers", None):
        return None
    par = dataclasses.replace(cfg.parallel, first_stage_decoder_layers=first)
    cand = dataclasses.replace(cfg, parallel=par)
    try:
        check(cand, plan.world)
    except ConfigError:
        return None
    return cand, plan_of(cand)


def balance_hint(cfg: Config, plan: Plan, plan_of: Callable[[Config], Plan]) -> str | None:
    """A line proposing `parallel.first_stage_decoder_layers` when it saves over 3% of a step."""
    found = balanced(cfg, plan, plan_of)
    if found is None or not found[1].fits or found[1].step_seconds > 0.97 * plan.step_seconds:
        return None
    first, better = found[0].parallel.first_stage_decoder_layers, found[1]
    return (f"hint        the first stage also runs the vision encoder: --set "
            f"parallel.first_stage_decoder_layers={first} balances the stages, "
            f"{better.step_seconds:.2f} s/step instead of {plan.step_seconds:.2f}")


def _passes_checks(cand: Config, world: int) -> bool:
    try:
        validate(cand)  # the config checks that depend on the layout (recompute with FP8, ...)
        check(cand, world)
    except ConfigError:
        return False
    return True


def runnable(cfg: Config, world: int, gpus_per_node: int) -> bool:
    """Whether any candidate layout of `world` GPUs passes the layout checks (heads and query
    groups by tp, layers by pp, the global batch by micro-batch x dp, ...), fitting or not."""
    return any(_passes_checks(cand, world) for cand in candidates(cfg, world, gpus_per_node))


def suggest(cfg: Config, world: int, gpus_per_node: int, plan_of: Callable[[Config], Plan],
            top: int = 3) -> list[tuple[Config, Plan]]:
    """The `top` fastest layouts of `world` GPUs that fit, fastest first; a pipelined layout
    with the first stage balanced (`balanced`) where that fits and is faster than an even split."""
    found = []
    for cand in candidates(cfg, world, gpus_per_node):
        if not _passes_checks(cand, world):
            continue
        plan = plan_of(cand)
        alt = balanced(cand, plan, plan_of) if cand.parallel.pp > 1 else None
        if alt is not None and alt[1].fits and (not plan.fits or alt[1].step_seconds < plan.step_seconds):
            cand, plan = alt
        if plan.fits:
            found.append((plan.step_seconds, len(found), cand, plan))
    found.sort(key=lambda item: item[:2])
    return [(c, p) for _, _, c, p in found[:top]]
