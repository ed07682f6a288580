"""Run the per-sample step ahead of the packer in worker processes; results come back in order.

Order never depends on timing: results are taken in the order of their positions, so any number of
workers gives the same batches. Workers come from a fork server: a clean single-threaded process
that imports the data stack once (~7 s here, once per training process) and forks each worker from
itself; forking the training process instead inherits locks held by its other threads (DALI,
tokenizers, torch) and was seen to deadlock. Each worker makes its own decoder on first use.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import util as mp_util

from mmpretrain.stop_signals import STOP_SIGNALS, stop_signals_held

_FN: Callable | None = None


def _init(fn: Callable, closing) -> None:
    """Worker start-up. The stop signals end a worker only once its pool is closing (the pool's
    terminate sends SIGTERM): a worker, or the fork server, killed by a signal to the whole job
    would leave the trainer waiting for a result that never comes while it should be saving its
    checkpoint. The pool is started with the signals blocked (the fork server keeps them
    blocked); each worker unblocks them once its handler is in place."""
    global _FN
    import torch

    def on_signal(signum, frame):
        if closing.is_set():
            os._exit(0)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    torch.set_num_threads(1)
    _FN = fn


def _run(arg):
    return _FN(arg)


POLL_S = 5.0
"""How often a wait for a result checks that no worker has died."""

KILL_AFTER_S = 2.0
"""How long a closing pool's workers have to exit on the pool's SIGTERM before they are killed."""


def _closing(workers: list, closing) -> threading.Timer:
    """Mark a pool as closing (its `workers` then exit on the SIGTERM of `Pool.terminate`), and
    kill those still alive KILL_AFTER_S later: a SIGTERM that lands just before a worker blocks
    on the task queue's lock (held by the terminating pool) runs its Python handler only once that
    wait returns, which it never does. Their results are discarded anyway."""
    closing.set()

    def kill_the_rest():
        for p in list(workers):  # the pool's own list: replacements it started meanwhile too
            if p.exitcode is None:
                p.kill()

    killer = threading.Timer(KILL_AFTER_S, kill_the_rest)
    killer.daemon = True
    killer.start()
    return killer


class WorkerPool:
    """`workers` processes running `fn`; `map` gives ordered results of any number of streams
    over the same processes (the loader's slots). workers=0: everything runs inline."""

    def __init__(self, fn: Callable, workers: int = 0):
        self.fn, self.workers, self.pool = fn, workers, None
        if workers > 0:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["mmpretrain.data.loader", "mmpretrain.data.build"])
            self.closing = ctx.Event()
            with stop_signals_held():  # the fork server and the workers inherit the block
                self.pool = ctx.Pool(workers, initializer=_init, initargs=(fn, self.closing))
            # A pool still open at interpreter exit (a loader's generator finalised after the
            # exit handlers: SystemExit(75) after a stop) is terminated by multiprocessing's exit
            # finalizer (priority 15), whose SIGTERM the workers ignore until `closing` is set:
            # set it first (priority 16), with the same fallback as `close`.
            self._at_exit = mp_util.Finalize(self.pool, _closing, args=(self.pool._pool, self.closing),
                                             exitpriority=16)
            self.started = list(self.pool._pool)  # workers never exit on their own but by dying
        self.in_flight: set = set()  # results submitted and not yet taken, of every stream

    def map(self, args: Iterable, lookahead: int = 0) -> Iterator:
        """fn(a) for each a of `args`, in order, computed at most `lookahead` ahead."""
        if self.pool is None:
            for a in args:
                yield self.fn(a)
            return
        lookahead = lookahead or 4 * self.workers
        pending: deque = deque()
        for a in args:
            pending.append(self.pool.apply_async(_run, (a,)))
            self.in_flight.add(pending[-1])
            if len(pending) >= lookahead:
                yield self._take(pending.popleft())
        while pending:
            yield self._take(pending.popleft())

    def _take(self, result):
        self.in_flight.discard(result)
        while True:
            try:
                return result.get(timeout=POLL_S)
            except mp.TimeoutError:
                self._check_workers()

    def _check_workers(self) -> None:
        """ChildProcessError when a worker has died (killed for memory, a crash in a decoder):
        the pool starts another, but the task the dead one held is lost and its result would be
        awaited forever."""
        for p in self.started:
            if p.exitcode is not None:
                how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit status {p.exitcode}"
                raise ChildProcessError(f"a data worker process died ({how}; SIGKILL is often the "
                                        f"kernel's out-of-memory killer): its sample is lost, so "
                                        f"the order cannot go on")
            if p not in self.pool._pool:  # replaced already, its exit code collected
                raise ChildProcessError("a data worker process died: its sample is lost, so the "
                                        "order cannot go on")

    def close(self, drain_s: float = 30.0) -> None:
        """Stop the worker processes. Results still in flight are awaited first (up to
        `drain_s`): `Pool.terminate` with unfinished tasks races its own result handler, which
        can see the workers' pipes close first and exit, and then terminate fails with
        "Cannot have cache with result_handler not alive" (seen in about 1 of 3 runs here)."""
        if self.pool is not None:
            deadline = time.monotonic() + drain_s
            for result in list(self.in_flight):
                result.wait(max(0.0, deadline - time.monotonic()))
            self.in_flight.clear()
            self._at_exit.cancel()
            killer = _closing(self.pool._pool, self.closing)
            self.pool.terminate()
            self.pool.join()
            killer.cancel()
            self.pool = None


def ordered_map(fn: Callable, args: Iterable, workers: int = 0, lookahead: int = 0) -> Iterator:
    """fn(a) for each a of `args`, in order; with `workers` processes at most `lookahead` ahead."""
    pool = WorkerPool(fn, workers)
    try:
        yield from pool.map(args, lookahead)
    finally:
        pool.close()
