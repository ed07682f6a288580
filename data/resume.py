"""A data-parallel rank's read position in the global sample stream, and resharding it.

Rank r of R reads the global positions origin + r, origin + r + R, ... except those in `done`
(already consumed before a change of the data-parallel size). `cursor` counts the rank's reads.

Guarantees on resume (what `PackedLoader.load_state_dict` restores):
- same DP size, each rank given its own state: every rank yields exactly the batches an
  uninterrupted run would have (the packer's buffer is re-read from its sample keys);
- another DP size, given the states of *all* old ranks (`reshard`): every global position is
  consumed exactly once over the old and the new run - nothing lost, nothing repeated. The new
  origin is the first position not consumed; positions beyond it that some old rank had consumed
  are listed in `done` and skipped; samples in old packer buffers are read again by the new ranks
  that own their positions (they were never emitted);
- another DP size, given only one old rank's state: approximate - the new origin is where that rank
  stood, so samples near the origin may be repeated or missed (up to the spread of the old ranks'
  positions plus their buffers). A warning says so.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Position:
    """This rank's place in the global stream."""

    cursor: int  # reads done by this rank (including positions skipped as done)
    rank: int
    size: int
    origin: int = 0
    done: set[int] = field(default_factory=set)

    def global_of(self, local: int) -> int:
        """Global position of this rank's `local`-th read."""
        return self.origin + local * self.size + self.rank

    def local_of(self, position: int) -> int:
        """Inverse of global_of."""
        return (position - self.origin - self.rank) // self.size

    def next_global(self) -> int:
        """The next global position this rank will read."""
        local = self.cursor
        while self.global_of(local) in self.done:
            local += 1
        return self.global_of(local)

    def iterate(self) -> Iterator[int]:
        """Global positions from the cursor on, forever (done ones left out)."""
        local = self.cursor
        while True:
            t = self.global_of(local)
            if t not in self.done:
                yield t
            local += 1

    def advance(self, position: int) -> None:
        """Mark `position` (and any done ones before it) read."""
        self.cursor = self.local_of(position) + 1

    def to_dict(self) -> dict:
        return {"origin": self.origin, "cursor": self.cursor, "dp_rank": self.rank,
                "dp_size": self.size, "done": sorted(self.done)}

    @classmethod
    def from_dict(cls, state: dict, rank: int, size: int) -> Position:
        return cls(state["cursor"], rank, size, state.get("origin", 0), set(state.get("done", [])))


def _consumed_fn(states: list[dict]):
    """A predicate: was global position t consumed (emitted or skipped) by the old ranks?"""
    size, origin = states[0]["dp_size"], states[0].get("origin", 0)
    done = set().union(*(s.get("done", []) for s in states))
    buffered = set().union(*(s["buffer"] for s in states))
    nxt = {s["dp_rank"]: origin + s["cursor"] * size + s["dp_rank"] for s in states}

    def consumed(t: int) -> bool:
        if t < origin or t in done:
            return True
        return t not in buffered and t < nxt[(t - origin) % size]

    return consumed, nxt, buffered


def reshard(states: list[dict], rank: int, size: int) -> dict:
    """The state of rank `rank` of `size` that continues after the old ranks' `states`."""
    old_size = states[0]["dp_size"]
    if old_size == size and len(states) == size:
        return next(s for s in states if s["dp_rank"] == rank)
    base = {k: v for k, v in states[0].items() if k not in ("cursor", "done", "buffer")}
    if len(states) != old_size or len({s.get("origin", 0) for s in states}) != 1:
        log.warning("data loader: resuming at data-parallel size %d from one rank's state of size %d:"
                    " samples near the resume point may repeat or be missed", size, old_size)
        s = states[0]
        origin = s.get("origin", 0) + s["cursor"] * old_size
        return {**base, "origin": origin, "cursor": 0, "done": [], "buffer": [],
                "dp_rank": rank, "dp_size": size}
    consumed, nxt, buffered = _consumed_fn(states)
    start = min([*buffered, *nxt.values()])
    while consumed(start):
        start += 1
    end = max(nxt.values())
    done = [t for t in range(start, end) if consumed(t)]
    counts: dict[str, int] = {}
    for s in states if rank == 0 else []:  # the totals go to the new rank 0
        for k, v in s.get("counts", {}).items():
            counts[k] = counts.get(k, 0) + v
    return {**base, "origin": start, "cursor": 0, "done": done, "buffer": [], "dp_rank": rank,
            "dp_size": size, "counts": counts, "tokens": 0, "slots": 0}
