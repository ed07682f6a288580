"""The packed loader over the real synthetic shards: determinism, data-parallel split, resume."""
import itertools

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
                         "image_sizes"))


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
