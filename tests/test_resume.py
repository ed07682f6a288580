"""Exact resume: batches after a restart (state through JSON) equal an uninterrupted run's, by
hash of every batch; with worker processes too. A change of the data-parallel size consumes every
global position exactly once."""
from __future__ import annotations

import hashlib
import itertools
import json

import pytest
from mmpretrain.data.resume import Position, reshard

from mmpretrain.config import load
from mmpretrain.dataset import make_loader, open_tokenizer

FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "sample_ids", "patches", "image_sizes",
          "image_tiles")


def batch_hash(batch) -> str:
    h = hashlib.sha256()
    for f in FIELDS:
        h.update(getattr(batch, f).contiguous().numpy().tobytes())
    return h.hexdigest()


def cfg_for(path, *sets):
    return load(None, [f"data.path={path}", "data.seq_length=128", "data.micro_batch_size=2",
                       "data.image_token_budget=16", "data.decoder=pillow", *sets])


def hashes(loader, n):
    return [batch_hash(b) for b in itertools.islice(iter(loader), n)]


@pytest.mark.parametrize("sets", [(), ("data.resize=tiles", "data.tile_size=32", "data.max_tiles=4",
                                       "data.max_patches=48")])
def test_restart_equals_uninterrupted_run(small_dataset, sets):
    cfg = cfg_for(small_dataset, *sets)
    tok = open_tokenizer(cfg)
    full = hashes(make_loader(cfg, "train", tok), 40)  # crosses an epoch (160 samples)
    for stop in (1, 7, 23):
        first = make_loader(cfg, "train", tok)
        it = iter(first)
        head = [batch_hash(next(it)) for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
        assert state["slots"][0]["buffer"], "the packer's buffer is part of the state"
        resumed = make_loader(cfg, "train", tok)
        resumed.load_state_dict(state)
        assert head + hashes(resumed, 40 - stop) == full, f"resume after {stop} batches"


@pytest.mark.parametrize("slots", [1, 3])
def test_workers_give_the_same_batches(small_dataset, slots):
    cfg = cfg_for(small_dataset)
    tok = open_tokenizer(cfg)
    inline = hashes(make_loader(cfg, "train", tok, slots=slots), 12)
    forked = make_loader(cfg_for(small_dataset, "data.workers=2"), "train", tok, slots=slots)
    it = iter(forked)
    head = [batch_hash(next(it)) for _ in range(5)]
    state = forked.state_dict()
    it.close()  # stops the workers
    again = make_loader(cfg_for(small_dataset, "data.workers=1"), "train", tok, slots=slots)
    again.load_state_dict(state)
    assert head + hashes(again, 7) == inline


def consume(state, n_reads, buffer_every=5):
    """Simulate a rank reading n_reads positions, every `buffer_every`-th left in its buffer."""
    pos = Position.from_dict(state)
    read, buffered = [], []
    for t in itertools.islice(pos.iterate(), n_reads):
        pos.advance(t)
        (buffered if len(read + buffered) % buffer_every == buffer_every - 1 else read).append(t)
    return read, {**state, **pos.to_dict(), "buffer": buffered}


def test_reshard_consumes_every_position_exactly_once():
    emitted = []
    states = []
    for rank, reads in enumerate([13, 29, 21]):  # three old ranks at uneven places
        read, st = consume({"cursor": 0, "slot": rank, "n_slots": 3}, reads)
        emitted += read
        states.append(st)
    for new_size in (2, 5):
        new_states = [reshard(states, r, new_size) for r in range(new_size)]
        again = list(emitted)
        for st in new_states:
            read, _ = consume(st, 40, buffer_every=10**9)
            again += read
        horizon = max(again) - 40  # well inside what every new rank covered
        seen = sorted(t for t in again if t < horizon)
        assert seen == list(range(horizon)), f"dp 3 -> {new_size}: lost or repeated positions"


def test_reshard_twice_before_the_new_slots_pass_the_old_ones():
    """3 slots -> 2, stopped after a few reads (the skip list reaches past where the 2 stand) ->
    4: the second reshard must keep those skips."""
    emitted, states = [], []
    for slot, reads in enumerate([13, 29, 21]):
        read, st = consume({"cursor": 0, "slot": slot, "n_slots": 3}, reads)
        emitted += read
        states.append(st)
    middle = []
    for slot in range(2):
        read, st = consume(reshard(states, slot, 2), 3)
        emitted += read
        middle.append(st)
    assert max(t for st in middle for t in st["done"]) > max(Position.from_dict(st).next_global()
                                                              for st in middle)
    for slot in range(4):
        emitted += consume(reshard(middle, slot, 4), 40, buffer_every=10**9)[0]
    horizon = max(emitted) - 40
    assert sorted(t for t in emitted if t < horizon) == list(range(horizon))


def test_reshard_from_states_of_a_real_loader(small_dataset):
    cfg = cfg_for(small_dataset)
    tok = open_tokenizer(cfg)
    states, emitted = [], []
    for rank, n in enumerate((3, 5)):
        loader = make_loader(cfg, "train", tok, dp_rank=rank, dp_size=2)
        it = iter(loader)
        for _ in range(n):
            next(it)
            emitted += loader.last_keys
        states.append(loader.state_dict())
    new = make_loader(cfg, "train", tok, dp_rank=0, dp_size=1)
    new.load_state_dict(states)
    it = iter(new)
    for _ in range(12):
        next(it)
        emitted += new.last_keys
    assert len(emitted) == len(set(emitted)), "a sample was repeated"
    assert set(range(40)) <= set(emitted), "a sample was lost"


def test_a_state_of_the_first_loader_resumes_approximately(small_dataset):
    cfg = cfg_for(small_dataset)
    loader = make_loader(cfg, "train", open_tokenizer(cfg))
    loader.load_state_dict({"epoch": 1, "index": 10, "skipped": {}})
    assert loader.state_dict()["slots"][0]["origin"] == 170
    assert next(iter(loader)).tokens.shape == (2, 128)


def test_a_state_of_the_one_packer_per_rank_loader_resumes_exactly(small_dataset):
    """Version 2 (one packer per data-parallel rank r of R) is slot r of R."""
    cfg = cfg_for(small_dataset)
    tok = open_tokenizer(cfg)
    full = hashes(make_loader(cfg, "train", tok), 10)
    first = make_loader(cfg, "train", tok)
    head = hashes(first, 4)
    slot = first.state_dict()["slots"][0]
    v2 = {"version": 2, "origin": slot["origin"], "cursor": slot["cursor"], "dp_rank": 0,
          "dp_size": 1, "done": slot["done"], "buffer": slot["buffer"], "counts": slot["counts"],
          "tokens": slot["tokens"], "slots": slot["capacity"]}
    resumed = make_loader(cfg, "train", tok)
    resumed.load_state_dict(v2)
    assert head + hashes(resumed, 6) == full
