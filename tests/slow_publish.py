"""`python tests/slow_publish.py STEP READY_FILE mmpretrain-args...`: runs `mmpretrain` with the
publish of checkpoint STEP held back (its files fully written under the temporary name) until
the process is killed; READY_FILE appears when it waits. For the kill-during-save test."""
import sys
import time
from pathlib import Path

from mmpretrain.checkpoint import store

step, ready = int(sys.argv[1]), Path(sys.argv[2])
publish = store._publish


def held_publish(tmp, final, *args, **kwargs):
    if final.name == f"step_{step:08d}":
        ready.write_text(str(tmp))
        time.sleep(600)
    return publish(tmp, final, *args, **kwargs)


store._publish = held_publish
if __name__ == "__main__":
    from mmpretrain.cli import main

    sys.exit(main(sys.argv[3:]))
