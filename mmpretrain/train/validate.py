"""Held-out loss during training (`train.eval_every`): the first `train.eval_samples` samples of
<data.path>/heldout, packed once at start, each data-parallel rank a share, run forward-only
through megatron's schedule (any layout). Samples are packed with block-diagonal masks and
positions restarting per sample, so the loss per text token does not depend on which samples
share a row: it is that of `mmpretrain eval` on the same samples."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mmpretrain.data.bestfit import BestFitPacker
from mmpretrain.data.decode import ImageError
from mmpretrain.data.packing import PackedBatch, pack_rows
from mmpretrain.data.sequence import SampleError
from mmpretrain.data.shards import ShardError
from mmpretrain.parallel import cuda_to_cpu, is_rank0
from mmpretrain.train.step import device, forward_backward, loss_totals

log = logging.getLogger("mmpretrain")


def pack_samples(samples: list[dict], loader) -> tuple[list[PackedBatch], int]:
    """`samples` made into sequences by the loader's rules (image policy, long samples) and packed
    by best fit into micro-batches of the loader's shape, as training packs; (batches, samples
    skipped: unreadable, or too long under data.long_samples 'drop'), each skip logged."""
    packer = BestFitPacker(loader.seq_len, loader.micro_batch, loader.tok.pad_id,
                           int(loader.packing.buffer * loader.micro_batch * loader.seq_len),
                           loader.packing.max_patches)
    batches, skipped = [], 0
    for i, sample in enumerate(samples):
        try:
            seq, _ = loader.maker.sequence(sample)
        except (ShardError, ImageError, SampleError) as e:
            seq = None
            log.warning("held-out sample %d skipped: %s", i, e)
        if seq is None:
            skipped += 1
            continue
        packer.add(i, seq)
        if packer.full:
            batches.append(packer.pop_batch())
    while (batch := packer.pop_batch()) is not None:
        batches.append(batch)
    return batches, skipped


class HeldoutLoss:
    """The held-out loss of the model being trained; built on every rank, called on every rank."""

    def __init__(self, loader, samples: int, dp_rank: int, dp_size: int, multiple: int = 1):
        """`loader`: a loader over the held-out split (not shuffled); `multiple`: the micro-batch
        count each call must be a multiple of (the interleaved schedule's pipeline size)."""
        self.samples = min(samples, len(loader.reader))
        if is_rank0() and self.samples < samples:
            log.info("train.eval_samples %d: the held-out split has %d samples, evaluating all "
                     "of them", samples, self.samples)
        mine = [loader.reader[i] for i in range(dp_rank, self.samples, dp_size)]
        self.batches, self.skipped = pack_samples(mine, loader)
        self.empty = pack_rows([[]] * loader.micro_batch, loader.seq_len, loader.tok.pad_id)
        self.multiple = multiple

    def _padded(self) -> list[PackedBatch]:
        """This rank's micro-batches, with empty ones (no text token, no image) up to the most
        any data-parallel rank has, rounded up to `multiple`: one schedule call on every rank."""
        most = torch.tensor([len(self.batches)], device=device())
        if dist.is_initialized():
            dist.all_reduce(most, op=dist.ReduceOp.MAX,
                            group=parallel_state.get_data_parallel_group())
        n = -(-max(int(most), 1) // self.multiple) * self.multiple
        return self.batches + [self.empty] * (n - len(self.batches))

    @torch.no_grad()
    def __call__(self, ddps: list, seq_len: int) -> float:
        """Loss per text token over the held-out samples (NaN when none has a text token)."""
        for ddp in ddps:
            ddp.eval()
        try:
            with cuda_to_cpu():
                outputs = forward_backward(ddps, self._padded(), seq_len, forward_only=True)
                total, tokens = loss_totals(outputs).tolist()
        finally:
            for ddp in ddps:
                ddp.train()
        return total / tokens if tokens else float("nan")
