"""The signals that ask a job to stop (SIGTERM: Slurm's preemption and scancel; SIGUSR1: its
warning ahead of the time limit), and keeping the job's helper processes alive through them.

Slurm signals every process of the job, not only the trainer. The trainer catches them
(`train/preempt.py`) and saves a checkpoint before it exits, and that save and the data it waits
for need the helper processes: megatron-core's checkpoint writers and the data workers. A process
spawned as a new interpreter takes the default action on these signals, which is to exit; one
started while they are blocked inherits the block."""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """STOP_SIGNALS blocked in this thread (still pending: a handler gets them when the block
    ends), so that the processes started meanwhile inherit the block. multiprocessing's resource
    tracker is started first, as starting it unblocks SIGTERM in the starting thread."""
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
