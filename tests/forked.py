"""`forked_map`: a function over arguments in forked child processes, for tests of what several
processes do at once (a forked child starts in milliseconds; a spawned one imports for seconds)."""
from __future__ import annotations

import multiprocessing as mp
import signal
from collections.abc import Callable, Sequence


def _default_stop_signals() -> None:
    """A forked child inherits whatever handlers this process has; a handler that only records
    the signal would keep a worker alive through the pool's SIGTERM."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


def forked_map(fn: Callable, args: Sequence, processes: int | None = None,
               timeout: float = 300.0) -> list:
    """[fn(a) for a in args], computed by a pool of forked processes whose workers end by the
    pool's own sentinel; a result missing after `timeout` seconds is a failure, not a hang."""
    with mp.get_context("fork").Pool(processes or len(args), _default_stop_signals) as pool:
        results = pool.map_async(fn, args).get(timeout)
        pool.close()
        pool.join()
    return results
