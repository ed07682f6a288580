"""A slot's read position in the global sample stream, and resharding positions.

The global batch of every step is `n_slots` micro-batches, one per slot. Slot j of S reads the
global positions origin + j, origin + j + S, ... except those in `done` (consumed before the
number of slots changed) and packs them with a packer of its own; `cursor` counts its reads.
Data-parallel rank r of R owns slots r, r + R, ... (R divides S). The slots do not depend on R,
so neither do the batches: a run resumed at another data-parallel size (same S) trains on the
same global batches as the original, and a slot's state is just handed to its new owner.

Guarantees on resume (what `PackedLoader.load_state_dict` restores):
- same number of slots, the states of all slots available (any data-parallel size): every slot
  yields exactly the micro-batches of an uninterrupted run (the packer's buffer is re-read from
  its sample keys);
- another number of slots (another global or micro-batch size), given the states of *all* old
  slots (`reshard`): every global position is consumed exactly once over the old and the new run -
  nothing lost, nothing repeated. The new origin is the first position not consumed; positions
  beyond it that some old slot had consumed are listed in `done` and skipped; samples in old packer
  buffers are read again by the new slots that own their positions (they were never emitted);
- given only some old slots' states: approximate - the new origin is where the first of them
  stood, so samples near the origin may be repeated or missed (up to the spread of the old slots'
  positions plus their buffers). A warning says so.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Position:
    """A slot's place in the global stream."""

    cursor: int  # reads done by this slot (including positions skipped as done)
    slot: int
    n_slots: int
    origin: int = 0
    done: set[int] = field(default_factory=set)

    def global_of(self, local: int) -> int:
        """Global position of this slot's `local`-th read."""
        return self.origin + local * self.n_slots + self.slot

    def local_of(self, position: int) -> int:
        """Inverse of global_of."""
        return (position - self.origin - self.slot) // self.n_slots

    def next_global(self) -> int:
        """The next global position this slot will read."""
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
        return {"origin": self.origin, "cursor": self.cursor, "slot": self.slot,
                "n_slots": self.n_slots, "done": sorted(self.done)}

    @classmethod
    def from_dict(cls, state: dict) -> Position:
        return cls(state["cursor"], state["slot"], state["n_slots"], state.get("origin", 0),
                   set(state.get("done", [])))


def slot_state(state: dict) -> dict:
    """A slot's state in the current form; a version-2 loader state (one packer per data-parallel
    rank r of R, reading positions r, r + R, ...) is exactly slot r of R."""
    if "slot" in state:
        return state
    out = {k: v for k, v in state.items() if k not in ("dp_rank", "dp_size", "version", "slots")}
    return {**out, "slot": state["dp_rank"], "n_slots": state["dp_size"],
            "capacity": state.get("capacity", state.get("slots", 0))}


def _consumed_fn(states: list[dict]):
    """A predicate: was global position t consumed (emitted or skipped) by the old slots?"""
    size, origin = states[0]["n_slots"], states[0].get("origin", 0)
    done = set().union(*(s.get("done", []) for s in states))
    buffered = set().union(*(s["buffer"] for s in states))
    nxt = {s["slot"]: origin + s["cursor"] * size + s["slot"] for s in states}

    def consumed(t: int) -> bool:
        if t < origin or t in done:
            return True
        return t not in buffered and t < nxt[(t - origin) % size]

    return consumed, nxt, buffered, done


def reshard(states: list[dict], slot: int, n_slots: int) -> dict:
    """The state of slot `slot` of `n_slots` that continues after the old slots' `states`."""
    states = [slot_state(s) for s in states]
    old_size = states[0]["n_slots"]
    if old_size == n_slots and len(states) == n_slots:
        return next(s for s in states if s["slot"] == slot)
    base = {k: v for k, v in states[0].items() if k not in ("cursor", "done", "buffer")}
    new = {"cursor": 0, "done": [], "buffer": [], "slot": slot, "n_slots": n_slots, "batches": 0,
           "tokens": 0, "capacity": 0}
    if len(states) != old_size or len({s["slot"] for s in states}) != old_size or \
            len({s.get("origin", 0) for s in states}) != 1:
        log.warning("data loader: resuming with %d slots from %d of the %d old slots' states: "
                    "samples near the resume point may repeat or be missed", n_slots, len(states),
                    old_size)
        s = states[0]
        return {**base, **new, "origin": s.get("origin", 0) + s["cursor"] * old_size,
                "counts": dict(s.get("counts", {})) if slot == 0 else {}}
    consumed, nxt, buffered, old_done = _consumed_fn(states)
    start = min([*buffered, *nxt.values()])
    while consumed(start):
        start += 1
    end = max([*nxt.values(), *(t + 1 for t in old_done)])  # old slots may have skipped past nxt
    done = [t for t in range(start, end) if consumed(t)]
    counts: dict[str, int] = {}
    for s in states if slot == 0 else []:  # the totals go to the new slot 0
        for k, v in s.get("counts", {}).items():
            counts[k] = counts.get(k, 0) + v
    return {**base, **new, "origin": start, "done": done, "counts": counts}
