"""The training data loader: global sample order -> token sequences -> best-fit packed micro-batches.

Its state (JSON) is the rank's read position and the keys of the samples in the packer's buffer;
restoring it re-reads those samples and continues, so the batches after a restart equal those of
an uninterrupted run. See `resume.py` for a change of the data-parallel size.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from mmpretrain.data.bestfit import BestFitPacker
from mmpretrain.data.images import ImagePreparer, ImageSettings
from mmpretrain.data.order import SampleOrder
from mmpretrain.data.packing import PackedBatch
from mmpretrain.data.resume import Position, reshard
from mmpretrain.data.source import Prepared, SampleMaker, SampleSource
from mmpretrain.data.workers import ordered_map

log = logging.getLogger(__name__)
STATE_VERSION = 2

__all__ = ["ImageSettings", "PackedLoader", "PackingSettings", "sample_order"]


@dataclass
class PackingSettings:
    """How sequences become micro-batches."""

    buffer: float = 2.0  # micro-batches' worth of tokens buffered before one is formed
    max_patches: int = 0  # most patches in one micro-batch's encoder stream (0: no limit)
    long_samples: str = "truncate"  # "truncate" | "drop"


def sample_order(n: int, seed: int, epoch: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """Sample indices rank `dp_rank` reads in epoch `epoch` of a single dataset of n samples
    (when n is a multiple of dp_size; otherwise ranks straddle epochs)."""
    order = SampleOrder([n], seed=seed)
    return np.array([order(epoch * n + t)[1] for t in range(dp_rank, n, dp_size)])


class PackedLoader:
    """Endless iterator of PackedBatch over one or several datasets in a seeded order.

    Ranks of one tensor/pipeline group pass the same dp_rank and so read the same samples;
    data-parallel ranks read disjoint ones (positions dp_rank, dp_rank + dp_size, ...).
    """

    def __init__(self, reader, tokenizer, images: ImageSettings, seq_len: int, micro_batch: int,
                 seed: int = 0, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True,
                 packing: PackingSettings | None = None, workers: int = 0,
                 weights: list[float] | None = None, device_id: int | None = None,
                 design: str = "d"):
        readers = reader.readers if isinstance(reader, SampleSource) else (
            list(reader) if isinstance(reader, (list, tuple)) else [reader])
        self.reader = SampleSource(readers, weights, seed, shuffle)
        self.tok, self.seq_len, self.micro_batch = tokenizer, seq_len, micro_batch
        self.seed, self.shuffle, self.dp_rank, self.dp_size = seed, shuffle, dp_rank, dp_size
        self.packing, self.workers = packing or PackingSettings(), workers
        self.merge = images.merge
        self.prepare = ImagePreparer(images, device_id)
        self.maker = SampleMaker(self.reader, tokenizer, self.prepare, images.merge, seq_len,
                                 self.packing.max_patches, self.packing.long_samples, design)
        self.position = Position(0, dp_rank, dp_size)  # next read of this rank
        self.buffer_keys: list[int] = []  # global positions in the packer's buffer
        self.counts: dict[str, int] = {}  # skipped_<reason>, truncated
        self.tokens, self.slots = 0, 0  # packed sample tokens / token slots emitted
        self.last_keys: list[int] = []  # global positions of the samples in the last batch
        self._logged: set[tuple[int, int]] = set()
        self._state = self._snapshot()

    # ------------------------------------------------------------------ state

    def _snapshot(self) -> dict:
        return {"version": STATE_VERSION, **self.position.to_dict(), "buffer": list(self.buffer_keys),
                "counts": dict(self.counts), "tokens": self.tokens, "slots": self.slots}

    def state_dict(self) -> dict:
        """Where the next batch starts (JSON): the read position and the packer's buffer."""
        return dict(self._state)

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Continue from a saved state; a list (every old rank's state) allows another DP size."""
        if isinstance(state, dict) and "version" not in state and "epoch" in state:
            state = self._from_v1(state)
        if isinstance(state, list) or state.get("dp_size", self.dp_size) != self.dp_size:
            state = reshard(state if isinstance(state, list) else [state], self.dp_rank, self.dp_size)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION} "
                             "(saved by an older loader); cannot resume the data position exactly")
        self._restore(state)
        self._state = self._snapshot()

    def _from_v1(self, state: dict) -> dict:
        """A state of the first loader ({epoch, index} of a per-rank permutation): approximate."""
        log.warning("data loader: resuming from an older loader's state; the sample order changed, "
                    "so the position is approximate")
        origin = state["epoch"] * len(self.reader) + state["index"] * self.dp_size
        return {"version": STATE_VERSION, "origin": origin, "cursor": 0, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "done": [], "buffer": [],
                "counts": {f"skipped_{k}": v for k, v in state.get("skipped", {}).items()}}

    def _restore(self, state: dict) -> None:
        self.position = Position.from_dict(state, self.dp_rank, self.dp_size)
        self.buffer_keys = list(state["buffer"])
        self.counts = dict(state.get("counts", {}))
        self.tokens, self.slots = state.get("tokens", 0), state.get("slots", 0)

    # ------------------------------------------------------------------ metrics

    @property
    def packing_efficiency(self) -> float:
        """Sample tokens / token slots of all batches emitted so far (1.0 before any)."""
        return self.tokens / self.slots if self.slots else 1.0

    def metrics(self) -> dict[str, float]:
        """`data/packing_efficiency`, `data/skipped_<reason>` and `data/truncated` counts."""
        out = {"data/packing_efficiency": self.packing_efficiency}
        out.update({f"data/{k}": v for k, v in sorted(self.counts.items())})
        return out

    @property
    def epoch(self) -> int:
        """Epochs of the first dataset completed before this rank's next read."""
        return self.reader.order.epoch(self.position.next_global())

    # ------------------------------------------------------------------ iteration

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _accept(self, p: Prepared) -> bool:
        """Count a skip (logging each sample once) or a truncation; whether p has a sequence."""
        if p.seq is None:
            self._count(f"skipped_{p.skip}")
            if p.key not in self._logged:
                self._logged.add(p.key)
                log.warning("skipping sample (%s): %s", p.skip, p.message)
            return False
        if p.truncated:
            self._count("truncated")
        return True

    def sequences(self) -> Iterator[tuple[int, object]]:
        """(global position, token sequence) in this rank's order, forever; skips counted."""
        for p in ordered_map(self.maker, self.position.iterate(), self.workers):
            self.position.advance(p.position)
            if self._accept(p):
                yield p.position, p.seq

    def __iter__(self) -> Iterator[PackedBatch]:
        self._restore(self._state)  # a new iteration starts after the last batch handed out
        packer = BestFitPacker(self.seq_len, self.micro_batch, self.tok.pad_id,
                               int(self.packing.buffer * self.micro_batch * self.seq_len),
                               self.packing.max_patches)
        for t in self.buffer_keys:  # the buffer at the saved position, rebuilt
            packer.add(t, self.maker(t).seq)
        for t, seq in self.sequences():
            packer.add(t, seq)
            if packer.full:
                yield self._emit(packer)

    def _emit(self, packer: BestFitPacker) -> PackedBatch:
        """Pop a batch, update the counters and the state snapshot."""
        before = packer.keys()
        batch = packer.pop_batch()
        self.buffer_keys = packer.keys()
        self.last_keys = sorted(set(before) - set(self.buffer_keys))
        self.tokens += int((batch.sample_ids >= 0).sum())
        self.slots += batch.sample_ids.numel()
        self._state = self._snapshot()
        return batch
