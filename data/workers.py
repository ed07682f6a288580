"""Run the per-sample step ahead of the packer in worker processes; results come back in order.

Order never depends on timing: results are taken in the order of their positions, so any number of
workers gives the same batches. Workers are forked (a spawned process would pay seconds of
imports) and each makes its own decoder on first use.
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
    pool = mp.get_context("fork").Pool(workers, initializer=_init, initargs=(fn,))
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
