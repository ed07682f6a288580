"""The training data loader: global sample order -> token sequences -> best-fit packed micro-batches.

A step's global batch is `n_slots` micro-batches (global batch size / micro-batch size). Slot j
reads the global positions j, j + S, j + 2S, ... and packs them with a best-fit packer of its own,
so what a step trains on does not depend on the data-parallel size: data-parallel rank r of R owns
slots r, r + R, ... and yields one micro-batch of each in turn per step (a rank reads, decodes and
buffers only its own slots' samples).

Its state (JSON) is per slot: the read position and the keys of the samples in the packer's
buffer; restoring it re-reads those samples and continues, so the batches after a restart equal
those of an uninterrupted run, under any data-parallel size that divides the number of slots. See
`resume.py` for a change of the number of slots.
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
from mmpretrain.data.remote import cache_metrics
from mmpretrain.data.resume import Position, reshard, slot_state
from mmpretrain.data.source import Prepared, SampleMaker, SampleSource
from mmpretrain.data.workers import WorkerPool

log = logging.getLogger(__name__)
STATE_VERSION = 3

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


class Slot:
    """One micro-batch slot of every global batch: its read position, the keys of the samples in
    its packer's buffer, and its counters."""

    def __init__(self, position: Position):
        self.position = position
        self.buffer_keys: list[int] = []  # global positions in the packer's buffer
        self.batches = 0  # micro-batches emitted
        self.counts: dict[str, int] = {}  # skipped_<reason>, truncated
        self.tokens, self.capacity = 0, 0  # packed sample tokens / token slots emitted

    @property
    def index(self) -> int:
        return self.position.slot

    def to_dict(self) -> dict:
        return {**self.position.to_dict(), "buffer": list(self.buffer_keys),
                "batches": self.batches, "counts": dict(self.counts), "tokens": self.tokens,
                "capacity": self.capacity}

    @classmethod
    def from_dict(cls, state: dict) -> Slot:
        slot = cls(Position.from_dict(state))
        slot.buffer_keys = list(state["buffer"])
        slot.batches = state.get("batches", 0)
        slot.counts = dict(state.get("counts", {}))
        slot.tokens, slot.capacity = state.get("tokens", 0), state.get("capacity", 0)
        return slot


class PackedLoader:
    """Endless iterator of PackedBatch over one or several datasets in a seeded order.

    `slots` (default: dp_size) is the number of micro-batches of a global batch; this rank yields
    those of slots dp_rank, dp_rank + dp_size, ... in turn. Ranks of one tensor/pipeline group
    pass the same dp_rank and so read the same samples; data-parallel ranks read disjoint ones.
    """

    def __init__(self, reader, tokenizer, images: ImageSettings, seq_len: int, micro_batch: int,
                 seed: int = 0, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True,
                 packing: PackingSettings | None = None, workers: int = 0,
                 weights: list[float] | None = None, device_id: int | None = None,
                 design: str = "d", slots: int | None = None):
        readers = reader.readers if isinstance(reader, SampleSource) else (
            list(reader) if isinstance(reader, (list, tuple)) else [reader])
        self.reader = SampleSource(readers, weights, seed, shuffle)
        self.sizes = [len(r) for r in readers]  # samples per dataset: the order depends on them
        self.tok, self.seq_len, self.micro_batch = tokenizer, seq_len, micro_batch
        self.seed, self.shuffle, self.dp_rank, self.dp_size = seed, shuffle, dp_rank, dp_size
        self.n_slots = slots or dp_size
        if self.n_slots % dp_size or not 0 <= dp_rank < dp_size:
            raise ValueError(f"{self.n_slots} micro-batch slots cannot be split over "
                             f"{dp_size} data-parallel ranks (rank {dp_rank})")
        self.packing, self.workers = packing or PackingSettings(), workers
        self.merge = images.merge
        self.prepare = ImagePreparer(images, device_id)
        self.maker = SampleMaker(self.reader, tokenizer, self.prepare, images.merge, seq_len,
                                 self.packing.max_patches, self.packing.long_samples, design)
        self.slots = [Slot(Position(0, j, self.n_slots))
                      for j in range(dp_rank, self.n_slots, dp_size)]  # this rank's
        self.last_keys: list[int] = []  # global positions of the samples in the last batch
        self.saved_sizes: list[int] | None = None  # dataset sizes of a loaded state
        self.saved_slots: int | None = None  # micro-batch slots of a loaded state
        self._logged: set[tuple[int, int]] = set()
        self._state = self._snapshot()

    # ------------------------------------------------------------------ state

    def _snapshot(self) -> dict:
        counts: dict[str, int] = {}
        for s in self.slots:
            for k, v in s.counts.items():
                counts[k] = counts.get(k, 0) + v
        return {"version": STATE_VERSION, "n_slots": self.n_slots, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "slots": [s.to_dict() for s in self.slots],
                "counts": counts,  # the counts of all this rank's slots, for reading only
                "sizes": self.sizes}  # the order's datasets, to tell a resume that they changed

    def state_dict(self) -> dict:
        """Where the next batch starts (JSON): per slot, the read position and the packer's buffer."""
        return dict(self._state)

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Continue from a saved state, or from the states of all old data-parallel ranks (a
        list): under any data-parallel size, the slots continue exactly where they stood.
        `saved_sizes` is then the saved state's dataset sizes (None from older loaders) and
        `saved_slots` its number of micro-batch slots."""
        by_slot: dict[int, dict] = {}
        states = state if isinstance(state, list) else [state]
        self.saved_sizes = next((st["sizes"] for st in states if "sizes" in st), None)
        for st in states:
            for s in self._upgrade(st)["slots"]:
                by_slot[s["slot"]] = s
        sizes = {s["n_slots"] for s in by_slot.values()}
        if len(sizes) != 1:
            raise ValueError(f"loader states of different numbers of slots: {sorted(sizes)}")
        self.saved_slots = sizes.pop()
        if self.saved_slots == self.n_slots and all(s.index in by_slot for s in self.slots):
            chosen = [by_slot[s.index] for s in self.slots]
        else:
            chosen = [reshard(list(by_slot.values()), s.index, self.n_slots) for s in self.slots]
        self._restore({"slots": chosen})
        self._state = self._snapshot()

    def _upgrade(self, state: dict) -> dict:
        """A saved state in the current form (older loaders' states converted)."""
        if "version" not in state and "epoch" in state:
            state = self._from_v1(state)
        if state.get("version") == 2:  # one packer per data-parallel rank: slot r of R
            return {"version": STATE_VERSION, "slots": [slot_state(state)]}
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION} "
                             "(saved by another loader); cannot resume the data position exactly")
        return state

    def _from_v1(self, state: dict) -> dict:
        """A state of the first loader ({epoch, index} of a per-rank permutation): approximate."""
        log.warning("data loader: resuming from an older loader's state; the sample order changed, "
                    "so the position is approximate")
        origin = state["epoch"] * len(self.reader) + state["index"] * self.dp_size
        return {"version": 2, "origin": origin, "cursor": 0, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "done": [], "buffer": [],
                "counts": {f"skipped_{k}": v for k, v in state.get("skipped", {}).items()}}

    def _restore(self, state: dict) -> None:
        self.slots = [Slot.from_dict(s) for s in state["slots"]]

    # ------------------------------------------------------------------ metrics

    @property
    def packing_efficiency(self) -> float:
        """Sample tokens / token slots of all batches emitted so far (1.0 before any)."""
        capacity = sum(s.capacity for s in self.slots)
        return sum(s.tokens for s in self.slots) / capacity if capacity else 1.0

    def metrics(self) -> dict[str, float]:
        """`data/packing_efficiency`, `data/skipped_<reason>` and `data/truncated` counts, and the
        shard cache's `data/cache_*` counters for remote datasets."""
        out = {"data/packing_efficiency": self.packing_efficiency}
        counts: dict[str, int] = {}
        for s in self.slots:
            for k, v in s.counts.items():
                counts[k] = counts.get(k, 0) + v
        out.update({f"data/{k}": v for k, v in sorted(counts.items())})
        out.update(cache_metrics(self.reader.readers))  # data/cache_* of remote datasets ({} if none)
        return out

    @property
    def epoch(self) -> int:
        """Epochs of the first dataset completed before this rank's next read."""
        return min(self.reader.order.epoch(s.position.next_global()) for s in self.slots)

    # ------------------------------------------------------------------ iteration

    def _accept(self, slot: Slot, p: Prepared) -> bool:
        """Count a skip (logging each sample once) or a truncation; whether p has a sequence."""
        key = f"skipped_{p.skip}" if p.seq is None else "truncated" if p.truncated else None
        if key:
            slot.counts[key] = slot.counts.get(key, 0) + 1
        if p.seq is None and p.key not in self._logged:
            self._logged.add(p.key)
            log.warning("skipping sample (%s): %s", p.skip, p.message)
        return p.seq is not None

    def _lookahead(self) -> int:
        """Samples each slot has in preparation by the workers (0: inline)."""
        return max(2, -(-4 * self.workers // len(self.slots))) if self.workers else 0

    def _sequences(self, slot: Slot, pool: WorkerPool) -> Iterator[tuple[int, object]]:
        for p in pool.map(slot.position.iterate(), self._lookahead()):
            slot.position.advance(p.position)
            if self._accept(slot, p):
                yield p.position, p.seq

    def sequences(self, slot: int = 0) -> Iterator[tuple[int, object]]:
        """(global position, token sequence) of this rank's `slot`-th slot in order, forever;
        skips counted."""
        pool = WorkerPool(self.maker, self.workers)
        try:
            yield from self._sequences(self.slots[slot], pool)
        finally:
            pool.close()

    def packer(self) -> BestFitPacker:
        """An empty best-fit packer of this loader's micro-batch shape, buffer and patch budget."""
        return BestFitPacker(self.seq_len, self.micro_batch, self.tok.pad_id,
                             int(self.packing.buffer * self.micro_batch * self.seq_len),
                             self.packing.max_patches)

    def __iter__(self) -> Iterator[PackedBatch]:
        self._restore(self._state)  # a new iteration starts after the last batch handed out
        pool = WorkerPool(self.maker, self.workers)
        try:
            packers, streams = {}, {}
            for s in self.slots:
                packers[s.index] = self.packer()
                for p in pool.map(s.buffer_keys, self._lookahead()):  # the saved buffer, rebuilt
                    if p.seq is None:  # read before, unreadable now (data changed): a skip
                        self._accept(s, p)
                        continue
                    packers[s.index].add(p.position, p.seq)
                streams[s.index] = self._sequences(s, pool)
            while True:
                slot = min(self.slots, key=lambda s: (s.batches, s.index))  # slots take turns
                packer = packers[slot.index]
                for t, seq in streams[slot.index]:
                    packer.add(t, seq)
                    if packer.full:
                        break
                yield self._emit(slot, packer)
        finally:
            pool.close()

    def _emit(self, slot: Slot, packer: BestFitPacker) -> PackedBatch:
        """Pop a batch, update the counters and the state snapshot."""
        before = packer.keys()
        batch = packer.pop_batch()
        slot.buffer_keys = packer.keys()
        self.last_keys = sorted(set(before) - set(slot.buffer_keys))
        slot.tokens += int((batch.sample_ids >= 0).sum())
        slot.capacity += batch.sample_ids.numel()
        slot.batches += 1
        self._state = self._snapshot()
        return batch
