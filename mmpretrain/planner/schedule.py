"""The pipeline schedule as the planner needs it: micro-batches in flight, bubble, step time.

The order is megatron-core's: 1F1B (Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM", arXiv 2104.04473, section 2.2) runs p - r - 1 warm-up
forwards on pipeline rank r, then alternates one forward and one backward; the interleaved
schedule runs (p - r - 1) * 2 + (v - 1) * p warm-up forwards, visiting the rank's v model chunks
in groups of p micro-batches (forwards in chunk order, backwards in reverse chunk order).
Simulating that order gives, per rank, the largest activation memory held at once; for equal
stages it reproduces Korthikanti et al.'s factor 1 + (p - 1) / (p * v) on the first stage.
"""
from __future__ import annotations


def _chunk(k: int, p: int, v: int, forward: bool) -> int:
    """Model chunk of the k-th forward (or backward) on a rank."""
    c = (k // p) % v
    return c if forward else v - 1 - c


def inflight_peak(p: int, v: int, m: int, rank: int, chunk_bytes: list[float]) -> float:
    """Largest sum of `chunk_bytes[c]` over the micro-batches in flight on pipeline rank `rank`
    (m micro-batches per step, v chunks per rank)."""
    total = m * v
    if v == 1:
        warmup = min(p - rank - 1, m)
    else:
        warmup = total if m == p else min((p - rank - 1) * 2 + (v - 1) * p, total)
    held, peak, fwd, bwd = 0.0, 0.0, 0, 0
    while bwd < total:
        if fwd < total and (fwd < warmup or fwd - bwd <= warmup):
            held += chunk_bytes[_chunk(fwd, p, v, True)]
            fwd += 1
            peak = max(peak, held)
        else:
            held -= chunk_bytes[_chunk(bwd, p, v, False)]
            bwd += 1
    return peak


def bubble_fraction(p: int, v: int, m: int) -> float:
    """Idle fraction of equal stages: (p - 1) / (v * m) of the ideal time (Narayanan et al.)."""
    return (p - 1) / (v * m)


def step_time(stage_times: list[float], m: int, v: int) -> float:
    """Seconds per step from each stage's forward+backward time per micro-batch.

    The slowest stage sets the pace of the steady state; filling and draining the pipeline adds the
    other stages' times once, divided by v under interleaving. For equal stages this is
    (m + (p - 1) / v) * t, the textbook bubble."""
    slowest = max(stage_times)
    return m * slowest + (sum(stage_times) - slowest) / v
