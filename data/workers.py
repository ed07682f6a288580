"""Run the per-sample step ahead of the packer in worker processes; results come back in order.

Order never depends on timing: results are taken in the order of their positions, so any number of
workers gives the same batches. Workers come from a fork server: a clean single-threaded process
that imports the data stack once (~7 s here, once per training process) and forks each worker from
itself; forking the training process instead inherits locks held by its other threads (DALI,
tokenizers, torch) and was seen to deadlock. Each worker makes its own decoder on first use.
"""
from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator

_FN: Callable | None = None


def _init(fn: Callable) -> None:
    global _FN
    import torch

    torch.set_num_threads(1)
    _FN = fn


def _run(arg):
    return _FN(arg)


def ordered_map(fn: Callable, args: Iterable, workers: int = 0, lookahead: int = 0) -> Iterator:
    """fn(a) for each a of `args`, in order; with `workers` processes at most `lookahead` ahead."""
    if workers <= 0:
        for a in args:
            yield fn(a)
        return
    lookahead = lookahead or 4 * workers
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mmpretrain.data.loader", "mmpretrain.data.build"])
    pool = ctx.Pool(workers, initializer=_init, initargs=(fn,))
    try:
        pending: deque = deque()
        it = iter(args)
        for a in it:
            pending.append(pool.apply_async(_run, (a,)))
            if len(pending) >= lookahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()
