"""`python tests/dying_worker.py`: ordered results from 2 workers, one of which is killed (as the
kernel's out-of-memory killer would) while it holds a task. Exits 3 with the error's text when
the pool says so, instead of waiting forever for the lost result."""
import os
import signal
import sys

import mmpretrain.data.workers as workers


def dies_on_3(x):
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


if __name__ == "__main__":
    workers.POLL_S = 0.5
    try:
        print(list(workers.ordered_map(dies_on_3, range(8), workers=2)))
    except ChildProcessError as e:
        print(f"error: {e}", flush=True)
        sys.exit(3)
