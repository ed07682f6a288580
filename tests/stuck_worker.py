"""`python tests/stuck_worker.py close|exit`: a WorkerPool whose one worker is stuck in a task with
the stop signals blocked, as a worker that missed the pool's SIGTERM (a signal that lands just
before it blocks on the task queue's lock is never handled). `close` closes the pool, `exit`
leaves it open and exits with 75 (multiprocessing's exit handlers terminate it). Either must end
the process; prints the seconds it took to close."""
import signal
import sys
import time

from mmpretrain.data.workers import WorkerPool, _run

from mmpretrain.stop_signals import STOP_SIGNALS


def stuck(x):
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    time.sleep(600)


if __name__ == "__main__":
    pool = WorkerPool(stuck, workers=1)
    pending = pool.pool.apply_async(_run, (0,))  # as `map` submits
    time.sleep(3)  # the worker has started the task
    t0 = time.monotonic()
    if sys.argv[1] == "close":
        pool.close(drain_s=0.1)
        print(f"closed in {time.monotonic() - t0:.1f} s", flush=True)
    else:
        KEEP = (pool, pending)
        sys.exit(75)
