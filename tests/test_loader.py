"""The packed loader over the real synthetic shards: determinism, data-parallel split, resume,
global batches that do not depend on the data-parallel size."""
import itertools
import json

import pytest
import torch
from mmpretrain.data.loader import sample_order

from mmpretrain.config import load
from mmpretrain.dataset import make_loader, open_tokenizer


def cfg_for(path, **overrides):
    sets = [f"data.path={path}", "data.seq_length=128", "data.micro_batch_size=2",
            "data.image_token_budget=16"] + [f"{k}={v}" for k, v in overrides.items()]
    return load(None, sets)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("tokens", "labels", "loss_mask", "position_ids", "sample_ids", "patches",
                         "image_sizes", "image_tiles"))


def test_order_is_a_seeded_disjoint_split():
    a = sample_order(100, 7, 0, 0, 2)
    b = sample_order(100, 7, 0, 1, 2)
    assert set(a).isdisjoint(b) and len(set(a) | set(b)) == 100
    assert (sample_order(100, 7, 0, 0, 2) == a).all()
    assert not (sample_order(100, 7, 1, 0, 2) == a).all()  # a new order each epoch


def test_batches_are_deterministic_and_well_formed(small_dataset):
    cfg = cfg_for(small_dataset)
    tok = open_tokenizer(cfg)
    x, y = take(make_loader(cfg, "train", tok), 3), take(make_loader(cfg, "train", tok), 3)
    assert all(same(a, b) for a, b in zip(x, y))
    for batch in x:
        assert batch.tokens.shape == (2, 128)
        n_img_tokens = int((batch.tokens == tok.img_id).sum())
        assert n_img_tokens == int((batch.image_sizes[:, 0] * batch.image_sizes[:, 1]).sum())
        assert batch.patches.shape[0] == n_img_tokens  # merge=1: one token per patch
        assert int((batch.image_sizes.prod(1) <= 16).all())  # the token budget holds
        assert batch.loss_mask.sum() > 0


def test_resume_from_state_continues_exactly(small_dataset):
    cfg = cfg_for(small_dataset)
    tok = open_tokenizer(cfg)
    loader = make_loader(cfg, "train", tok)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()
    rest = [next(it) for _ in range(4)]
    resumed = make_loader(cfg, "train", tok)
    resumed.load_state_dict(state)
    again = take(resumed, 4)
    assert all(same(a, b) for a, b in zip(rest, again))
    assert not same(first[0], again[0])


def test_epochs_roll_over(small_dataset):
    cfg = cfg_for(small_dataset, **{"data.seq_length": 512, "data.micro_batch_size": 4})
    tok = open_tokenizer(cfg)
    loader = make_loader(cfg, "heldout", tok)  # 32 samples: a few batches per epoch
    take(loader, 12)
    assert loader.epoch >= 1


def test_data_parallel_ranks_read_disjoint_samples(small_dataset):
    cfg = cfg_for(small_dataset)
    tok = open_tokenizer(cfg)
    seen = []
    for rank in range(2):
        loader = make_loader(cfg, "train", tok, dp_rank=rank, dp_size=2)
        seqs = list(itertools.islice(loader.sequences(), 20))
        seen.append({tuple(s.ids) for _, s in seqs})
    assert seen[0].isdisjoint(seen[1])


def test_best_fit_packs_densely_and_reports_it(small_dataset):
    cfg = cfg_for(small_dataset, **{"data.seq_length": 256, "data.micro_batch_size": 4})
    loader = make_loader(cfg, "train", open_tokenizer(cfg))
    batches = take(loader, 10)
    eff = loader.metrics()["data/packing_efficiency"]
    assert eff == loader.packing_efficiency > 0.95
    assert abs(eff - sum(b.efficiency for b in batches) / len(batches)) < 1e-6


def test_patch_budget_bounds_every_micro_batch(small_dataset):
    cfg = cfg_for(small_dataset, **{"data.max_patches": 40})
    for batch in take(make_loader(cfg, "train", open_tokenizer(cfg)), 15):
        assert batch.patches.shape[0] == int(batch.image_sizes.prod(1).sum()) <= 40


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_long_samples_are_truncated_or_dropped_and_counted(small_dataset, policy):
    cfg = cfg_for(small_dataset, **{"data.seq_length": 40, "data.long_samples": policy})
    tok = open_tokenizer(cfg)
    loader = make_loader(cfg, "train", tok)
    seqs = [s for _, s in itertools.islice(loader.sequences(), 30)]
    assert all(len(s) <= 40 for s in seqs)
    key = "data/truncated" if policy == "truncate" else "data/skipped_too_long"
    assert loader.metrics()[key] > 0
    for s in seqs:  # whole images only: as many [IMG_END] as images
        assert sum(t == tok.img_end_id for t in s.ids) == len(s.images)


def test_mixture_of_datasets_by_weight(small_dataset):
    mix = f"[{{path: {small_dataset}/train, weight: 3}}, {{path: {small_dataset}/heldout, weight: 1}}]"
    cfg = cfg_for(small_dataset, **{"data.datasets": mix})
    loader = make_loader(cfg, "train", open_tokenizer(cfg))
    assert len(loader.reader.readers) == 2 and len(loader.reader) == 160 + 32
    picks = [loader.reader.order(t)[0] for t in range(1000)]
    assert picks.count(0) == 750 and picks.count(1) == 250


def test_tiles_policy_through_the_loader(small_dataset):
    cfg = cfg_for(small_dataset, **{"data.resize": "tiles", "data.tile_size": 32,
                                    "data.max_tiles": 4, "data.seq_length": 256})
    tok = open_tokenizer(cfg)
    for batch in take(make_loader(cfg, "train", tok), 3):
        n_img = int((batch.tokens == tok.img_id).sum())
        assert n_img == int(batch.image_sizes.prod(1).sum()) == batch.patches.shape[0]
        assert (batch.image_sizes == 2).all()  # 32 px tiles of 16 px patches
        tags = sum(int((batch.tokens == tok.tile_id(k)).sum()) for k in range(1, 5))
        thumbs = int((batch.tokens == tok.thumbnail_id).sum())
        assert tags + thumbs == len(batch.image_tiles) and thumbs == int((batch.image_tiles == -1).sum())
        assert batch.loss_mask[batch.tokens == tok.thumbnail_id].sum() == 0


def hashes_by_slot(cfg, tok, dp_size, steps, n_slots, state=None):
    """{(step, slot): batch} over all data-parallel ranks, each rank's loader started from `state`
    (one state, or the list of all old ranks' states) when given; and the ranks' new states."""
    out, states = {}, []
    for rank in range(dp_size):
        loader = make_loader(cfg, "train", tok, rank, dp_size, slots=n_slots)
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
        it = iter(loader)
        start = loader.slots[0].batches
        for step in range(start, start + steps):
            for slot in range(rank, n_slots, dp_size):  # the order the training loop takes them
                out[step, slot] = next(it)
        states.append(loader.state_dict())
    return out, states


def test_global_batches_do_not_depend_on_the_data_parallel_size(small_dataset):
    cfg = cfg_for(small_dataset)
    tok = open_tokenizer(cfg)
    want, _ = hashes_by_slot(cfg, tok, 1, 6, 4)
    assert len({tuple(b.tokens.flatten().tolist()) for b in want.values()}) == 24
    for dp in (2, 4):
        got, _ = hashes_by_slot(cfg, tok, dp, 6, 4)
        assert got.keys() == want.keys() and all(same(got[k], want[k]) for k in want), dp
    one = make_loader(cfg, "train", tok, 1, 2, slots=4)  # a rank reads only its own slots
    seqs = [t for t, _ in itertools.islice(one.sequences(), 10)]
    assert all(t % 4 == 1 for t in seqs)
    with pytest.raises(ValueError, match="cannot be split"):
        make_loader(cfg, "train", tok, 0, 3, slots=4)


@pytest.mark.parametrize("old_dp, new_dp", [(1, 2), (2, 1), (2, 4)])
def test_resume_under_another_data_parallel_size_gives_the_same_batches(small_dataset, old_dp,
                                                                         new_dp):
    cfg = cfg_for(small_dataset)
    tok = open_tokenizer(cfg)
    want, _ = hashes_by_slot(cfg, tok, 1, 9, 4)
    _, states = hashes_by_slot(cfg, tok, old_dp, 4, 4)
    got, _ = hashes_by_slot(cfg, tok, new_dp, 5, 4, states)
    assert sorted(got) == [(s, j) for s in range(4, 9) for j in range(4)]
    assert all(same(got[k], want[k]) for k in got)


def test_checkpointed_states_reshard_exactly_at_the_same_data_parallel_size(small_dataset,
                                                                           tmp_path, monkeypatch):
    """Data-parallel size 2 both times, 4 slots -> 2 (a smaller global batch): every rank must be
    handed all old ranks' states, so that nothing is lost or repeated."""
    from megatron.core import parallel_state

    from mmpretrain.checkpoint.store import _loader_state

    cfg = cfg_for(small_dataset)
    tok = open_tokenizer(cfg)
    emitted = []
    for rank in range(2):
        loader = make_loader(cfg, "train", tok, rank, 2, slots=4)
        it = iter(loader)
        for _ in range(2 * (rank + 2)):  # the ranks' slots at uneven places
            next(it)
            emitted += loader.last_keys
        (tmp_path / f"loader_dp{rank}.json").write_text(json.dumps(loader.state_dict()))
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: 2)
    new = []
    for rank in range(2):
        monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda r=rank: r)
        loader = make_loader(cfg, "train", tok, rank, 2, slots=2)
        loader.load_state_dict(_loader_state(tmp_path, {"layout": [1, 1, 1, 2]}))
        it = iter(loader)
        for _ in range(12):
            next(it)
            emitted += loader.last_keys
        new.append(loader)
    horizon = min(ld.slots[0].position.next_global() for ld in new)
    buffered = {t for ld in new for t in ld.slots[0].buffer_keys}
    assert len(emitted) == len(set(emitted)), "a sample was repeated"
    assert all(t in emitted or t in buffered for t in range(horizon)), "a sample was lost"


def test_a_buffered_sample_unreadable_on_resume_is_a_counted_skip(small_dataset, caplog):
    """The packer's buffer is re-read on resume; a sample there that no longer reads (the data
    changed meanwhile) is skipped and counted, the others packed as before."""
    from mmpretrain.data.shards import ShardError

    class Damaged:
        """A reader whose row `row` has become unreadable."""

        def __init__(self, reader, row):
            self.reader, self.row = reader, row

        def __getitem__(self, index):
            if index == self.row:
                raise ShardError("corrupt_sample", f"row {index}: damaged")
            return self.reader[index]

        def __getattr__(self, name):
            return getattr(self.reader, name)

    cfg = cfg_for(small_dataset)
    tok = open_tokenizer(cfg)
    loader = make_loader(cfg, "train", tok)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    gone = state["slots"][0]["buffer"][0]
    resumed = make_loader(cfg, "train", tok)
    resumed.load_state_dict(state)
    source = resumed.maker.source
    dataset, row = source.order(gone)
    source.readers[dataset] = Damaged(source.readers[dataset], row)  # this loader's own list
    keys = []
    for _ in take(resumed, 3):
        keys += resumed.last_keys
    assert gone not in keys and resumed.metrics()["data/skipped_corrupt_sample"] == 1
    assert "damaged" in caplog.text
