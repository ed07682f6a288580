"""The data loader's `data/*` metrics over all data-parallel ranks (each rank reads only its own
slots' samples, so its skip and truncation counts are its share)."""
from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

COUNTED = ("data/skipped_", "data/truncated")


def merge(every: list[dict]) -> dict:
    """The ranks' `loader.metrics()` as one: counts summed; packing efficiency averaged (every
    rank packs micro-batches of one shape); the shard cache's counters, which count the whole
    node's cache already, as the first rank saw them."""
    out = dict(every[0])
    out["data/packing_efficiency"] = sum(m["data/packing_efficiency"] for m in every) / len(every)
    for key in sorted({k for m in every for k in m if k.startswith(COUNTED)}):
        out[key] = sum(m.get(key, 0) for m in every)
    return out


def data_metrics(loader) -> dict:
    """`loader.metrics()` merged over the data-parallel group: a collective, every rank calls it."""
    mine = loader.metrics()
    group = parallel_state.get_data_parallel_group()
    ranks = dist.get_world_size(group)
    if ranks == 1:
        return mine
    every: list = [None] * ranks
    dist.all_gather_object(every, mine, group=group)
    return merge(every)
