"""The packed loader over the real synthetic shards: determinism, data-parallel split, resume."""
import itertools

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
