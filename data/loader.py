"""The training data loader: a seeded, rank-sharded sample order -> token sequences -> packed
micro-batches. Its position is a pair of integers, so a checkpoint can restore it exactly."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
from mmpretrain.data.images import prepare
from mmpretrain.data.packing import PackedBatch, RowPacker
from mmpretrain.data.sequence import build_sequence, truncate

log = logging.getLogger(__name__)


@dataclass
class ImageSettings:
    """How images become encoder input."""

    patch_size: int
    token_budget: int
    merge: int = 1
    max_upscale: float = 2.0


def sample_order(n: int, seed: int, epoch: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """This rank's share of epoch `epoch`'s permutation of range(n)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[dp_rank::dp_size]


class PackedLoader:
    """Endless iterator of PackedBatch over a ShardReader, in a seeded order per epoch.

    Ranks of one tensor/pipeline group pass the same dp_rank and so read the same samples;
    data-parallel ranks read disjoint ones.
    """

    def __init__(self, reader, tokenizer, images: ImageSettings, seq_len: int, micro_batch: int,
                 seed: int = 0, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True):
        self.reader, self.tok, self.seq_len = reader, tokenizer, seq_len
        self.micro_batch, self.seed, self.shuffle = micro_batch, seed, shuffle
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.prepare = partial(prepare, patch=images.patch_size, budget=images.token_budget,
                               merge=images.merge, max_upscale=images.max_upscale)
        self.merge = images.merge
        self.epoch, self.index = 0, 0  # position of the next sample to read
        self.resume_at = (0, 0)  # position of the first sample not yet in an emitted batch
        self.skipped: dict[str, int] = {}

    def state_dict(self) -> dict:
        """Where the next batch starts: iterating again from here repeats no emitted sample."""
        epoch, index = self.resume_at
        return {"epoch": epoch, "index": index, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position."""
        self.epoch, self.index = state["epoch"], state["index"]
        self.resume_at = (self.epoch, self.index)
        self.skipped = dict(state.get("skipped", {}))

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.reader))[self.dp_rank::self.dp_size]
        return sample_order(len(self.reader), self.seed, self.epoch, self.dp_rank, self.dp_size)

    def _skip(self, reason: str, idx: int, err: Exception) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("skipping sample %d (%s): %s", idx, reason, err)

    def sequences(self) -> Iterator:
        """(position, token sequence) in order, forever; bad samples are counted and skipped."""
        while True:
            order = self._order()
            if len(order) == 0:
                raise ValueError("the dataset has no samples for this data-parallel rank")
            while self.index < len(order):
                pos, idx = (self.epoch, self.index), int(order[self.index])
                self.index += 1
                try:
                    seq = build_sequence(self.reader[idx], self.tok, self.prepare, self.merge)
                except OSError as e:  # Pillow's undecodable image
                    self._skip("undecodable image", idx, e)
                    continue
                yield pos, truncate(seq, self.seq_len, self.tok)
            self.epoch, self.index = self.epoch + 1, 0

    def __iter__(self) -> Iterator[PackedBatch]:
        self.epoch, self.index = self.resume_at
        packer = RowPacker(self.seq_len, self.micro_batch, self.tok.pad_id)
        for pos, seq in self.sequences():
            batch = packer.add(seq)
            if batch is not None:
                self.resume_at = pos  # `seq` opened the packer's next row
                yield batch
