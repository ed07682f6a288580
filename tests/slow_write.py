"""`python tests/slow_write.py STEP READY_FILE mmpretrain-args...`: runs `mmpretrain` with the
tensor files of checkpoint STEP never finishing: the process that writes them (megatron's
`FileSystemWriterAsync.write_preloaded_data_multiproc`, forked for an asynchronous save, called
in place for a synchronous one) writes READY_FILE and sleeps until it is killed. For the
kill-during-asynchronous-save test."""
import sys
import time
from pathlib import Path

from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

step, ready = int(sys.argv[1]), Path(sys.argv[2])
write = FileSystemWriterAsync.write_preloaded_data_multiproc


def held_write(transform_list, use_msc, rank, write_buckets, results_queue):
    if any(f"step_{step:08d}" in bucket[0] for bucket in write_buckets):
        ready.write_text(bucket_dir(write_buckets))
        time.sleep(600)
    return write(transform_list, use_msc, rank, write_buckets, results_queue)


def bucket_dir(write_buckets) -> str:
    return str(Path(write_buckets[0][0]).parent)


FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(held_write)
if __name__ == "__main__":
    from mmpretrain.cli import main

    sys.exit(main(sys.argv[3:]))
