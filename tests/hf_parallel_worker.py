"""Re-saves a checkpoint under tensor x pipeline parallelism for tests/test_hf_parallel.py.

    torchrun --nproc-per-node 4 tests/hf_parallel_worker.py CONFIG.yaml SOURCE_CKPT OUT_RUN [LAYOUT]

Starts the training set-up with TP=2 x PP=2 (or LAYOUT: comma-separated overrides such as
`parallel.tp=2,parallel.pp=1` for 2 processes), loads SOURCE_CKPT (saved by one process) and saves a
full training checkpoint (model, optimizer, schedule) of step 1 into OUT_RUN.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from mmpretrain.parallel import cuda_to_cpu, destroy_distributed  # noqa: E402

from mmpretrain import checkpoint  # noqa: E402
from mmpretrain.config import load  # noqa: E402
from mmpretrain.train.loop import setup  # noqa: E402


def main(config: str, source: str, out: str, layout: str = "parallel.tp=2,parallel.pp=2") -> None:
    cfg = load(config, layout.split(","))
    _, _, chunks, _, optimizer, scheduler = setup(cfg)
    with cuda_to_cpu():
        checkpoint.load_training(Path(source), chunks, optimizer, scheduler)
        checkpoint.save(out, 1, chunks, optimizer, scheduler, None, cfg, 0)
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:5])
