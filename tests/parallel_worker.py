"""Runs parallel layouts under torchrun for tests/test_parallel_parity.py.

    torchrun --nproc-per-node N tests/parallel_worker.py SPEC.json

For each layout in the spec: start megatron-core with it, load the reference weights, train the
reference micro-batches for a few steps, and (rank 0) write the losses and the full gradients of the
first step to <out>/<layout>.pt. One process group serves every layout of a world size.
"""
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed.param_and_grad_buffer import shard_buffer  # noqa: E402
from mmpretrain.data.packing import PackedBatch  # noqa: E402
from mmpretrain.parallel import destroy_distributed  # noqa: E402
from mmpretrain.parallel.full_state import gather_full, load_full  # noqa: E402

from mmpretrain.config import load  # noqa: E402
from mmpretrain.train.loop import setup  # noqa: E402
from mmpretrain.train.step import train_step  # noqa: E402


def batch_from(d: dict) -> PackedBatch:
    return PackedBatch(**d)


def batch_to(b: PackedBatch) -> dict:
    return {f.name: getattr(b, f.name) for f in dataclasses.fields(b)}


def merge_rows(batches: list[PackedBatch]) -> PackedBatch:
    """Micro-batches of one row each -> one micro-batch of their rows (images in row order)."""
    seq_len = batches[0].tokens.shape[1]
    anchors = [torch.where(b.image_anchors >= 0, b.image_anchors + r * seq_len, b.image_anchors)
               for r, b in enumerate(batches)]
    fields = {f.name: torch.cat([getattr(b, f.name) for b in batches])
              for f in dataclasses.fields(PackedBatch)}
    return PackedBatch(**{**fields, "image_anchors": torch.cat(anchors)})


def unshard_dp_grads(ddps) -> None:
    """With the distributed optimizer each data-parallel rank holds only its reduced shard of a
    bucket's gradients: gather the shards so every rank sees the whole reduced gradient."""
    group = ps.get_data_parallel_group()
    dp, rank = dist.get_world_size(group), dist.get_rank(group)
    for ddp in ddps:
        for buffer in ddp.buffers:
            for bucket in buffer.buckets:
                shards = shard_buffer(bucket.grad_data, dp)
                dist.all_gather(list(shards), shards[rank].clone(), group=group)


def run_layout(cfg, ref: dict) -> dict:
    """Train the reference batches under cfg's layout; losses and first-step gradients."""
    layout, _, chunks, ddps, optimizer, scheduler = setup(
        cfg, init_weights=lambda c: load_full(c, ref["weights"]))
    dp_rank, dp = ps.get_data_parallel_rank(), layout.dp
    grads: dict = {}

    def capture():
        if cfg.parallel.distributed_optimizer:
            unshard_dp_grads(ddps)
        grads.update(gather_full(chunks, grads=True))

    losses = []
    for step, global_batch in enumerate(ref["batches"]):
        n, mbs = len(global_batch) // dp, cfg.data.micro_batch_size  # the reference's are rows
        rows = [batch_from(d) for d in global_batch[dp_rank * n:(dp_rank + 1) * n]]
        mine = [merge_rows(rows[i:i + mbs]) for i in range(0, n, mbs)]
        loss, *_ = train_step(ddps, optimizer, mine, cfg.data.seq_length,
                              after_backward=capture if step == 0 else None)
        scheduler.step(1)
        losses.append(loss)
    return {"losses": losses, "grads": grads}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    ref = torch.load(spec["reference"], weights_only=True)
    out = Path(spec["out"])
    for name, sets in spec["layouts"].items():
        cfg = load(None, spec["base"] + sets)
        result = run_layout(cfg, ref)
        if dist.get_rank() == 0:
            torch.save(result, out / f"{name}.pt")
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
