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

from mmpretrain.config import ConfigError
from mmpretrain.data.decode import ImageError
from mmpretrain.data.packing import PackedBatch, pack_rows
from mmpretrain.data.sequence import SampleError
from mmpretrain.data.shards import ShardError
from mmpretrain.parallel import cuda_to_cpu, is_rank0
from mmpretrain.train.fp8_state import fp8_scaling_kept
from mmpretrain.train.step import device, forward_backward, loss_totals

log = logging.getLogger("mmpretrain")


def read_samples(reader, indices, log_skips: bool = True) -> tuple[list[dict], int]:
    """The samples at `indices` of `reader`; (samples, rows that could not be read), each logged."""
    samples, skipped = [], 0
    for i in indices:
        try:
            samples.append(reader[i])
        except ShardError as e:  # its message names the shard and row
            skipped += 1
            if log_skips:
                log.warning("held-out sample %d skipped: %s", i, e)
    return samples, skipped


def pack_samples(samples: list[dict], loader, log_skips: bool = True
                 ) -> tuple[list[PackedBatch], int]:
    """`samples` made into sequences by the loader's rules (image policy, long samples) and packed
    by best fit into micro-batches of the loader's shape, as training packs; (batches, samples
    skipped: an unreadable image or text, or too long under data.long_samples 'drop')."""
    packer = loader.packer()
    batches, skipped = [], 0
    for i, sample in enumerate(samples):
        try:
            seq, _ = loader.maker.sequence(sample)
        except (ImageError, SampleError) as e:
            seq = None
            if log_skips:
                log.warning("held-out sample %s skipped: %s", sample.get("id", i), e)
        if seq is None:
            skipped += 1
            continue
        packer.add(i, seq)
        if packer.full:
            batches.append(packer.pop_batch())
    while (batch := packer.pop_batch()) is not None:
        batches.append(batch)
    return batches, skipped


def _first_of_model_parallel_group() -> bool:
    """Whether this rank is the first of its tensor/pipeline group (all read the same samples)."""
    if not parallel_state.model_parallel_is_initialized():
        return True
    return dist.get_rank(group=parallel_state.get_model_parallel_group()) == 0


def _data_parallel_sum(values: list[float]) -> list[float]:
    """`values` summed over the data-parallel group (collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_initialized():
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t.tolist()


class HeldoutLoss:
    """The held-out loss of the model being trained; built on every rank, called on every rank."""

    def __init__(self, loader, samples: int, dp_rank: int, dp_size: int, multiple: int = 1):
        """`loader`: a loader over the held-out split (not shuffled); `multiple`: the micro-batch
        count each call must be a multiple of (the interleaved schedule's pipeline size). The
        packed micro-batches of this rank's share stay in host memory for the run. A ConfigError
        (on every rank) when the samples hold no text token to score."""
        self.samples = min(samples, len(loader.reader))
        if is_rank0() and self.samples < samples:
            log.info("train.eval_samples %d: the held-out split has %d samples, evaluating all "
                     "of them", samples, self.samples)
        talk = _first_of_model_parallel_group()  # one rank per share logs its skips
        mine, unread = read_samples(loader.reader, range(dp_rank, self.samples, dp_size), talk)
        self.batches, unfit = pack_samples(mine, loader, talk)
        self.empty = pack_rows([[]] * loader.micro_batch, loader.seq_len, loader.tok.pad_id)
        self.multiple = multiple
        skipped, tokens = _data_parallel_sum(
            [unread + unfit, sum(float(b.loss_mask.sum()) for b in self.batches)])
        if tokens == 0:
            raise ConfigError(f"train.eval_every: the first {self.samples} held-out samples have "
                              f"no text token to score ({int(skipped)} could not be used)")
        if is_rank0() and skipped:
            log.warning("%d of the %d held-out samples skipped (logged above); evaluating the "
                        "rest", int(skipped), self.samples)

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
        """Loss per text token over the held-out samples."""
        for ddp in ddps:
            ddp.eval()
        try:
            with cuda_to_cpu(), fp8_scaling_kept(ddps):
                outputs = forward_backward(ddps, self._padded(), seq_len, forward_only=True)
                total, tokens = loss_totals(outputs).tolist()
        finally:
            for ddp in ddps:
                ddp.train()
        return total / tokens
