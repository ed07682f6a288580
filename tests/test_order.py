"""The global sample order: seeded bijections, mixtures by weight, data-parallel split; remote
datasets through the local shard cache."""
from __future__ import annotations

import collections

import pytest
from mmpretrain.data.order import Permutation, SampleOrder, quotas, rank_position
from mmpretrain.data.remote import ShardFetcher, cache_dir_for, is_remote
from mmpretrain.data.shards import ShardReader, write_shards
from mmpretrain.data.source import open_dataset
from test_shards import _samples


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 4097])
def test_permutation_is_a_seeded_bijection(n):
    p = Permutation(n, 3, 0, 0)
    out = [p(i) for i in range(n)]
    assert sorted(out) == list(range(n))
    assert out == [Permutation(n, 3, 0, 0)(i) for i in range(n)]
    if n >= 100:
        assert out != [Permutation(n, 4, 0, 0)(i) for i in range(n)]
        assert sum(a == b for a, b in zip(out, range(n))) < n // 10  # really shuffled


def test_single_dataset_epochs_are_permutations():
    order = SampleOrder([50], seed=1)
    for epoch in range(3):
        got = [order(epoch * 50 + t) for t in range(50)]
        assert sorted(i for _, i in got) == list(range(50)) and {d for d, _ in got} == {0}
    assert [order(t)[1] for t in range(50)] != [order(50 + t)[1] for t in range(50)]
    assert order.epoch(149) == 2 and order.epoch(150) == 3
    assert [SampleOrder([5], shuffle=False)(t)[1] for t in range(7)] == [0, 1, 2, 3, 4, 0, 1]


def test_mixture_follows_the_weights_exactly_per_period():
    assert quotas([3, 1], 1000) == [750, 250] and sum(quotas([1, 1, 1], 1000)) == 1000
    with pytest.raises(ValueError, match="positive"):
        quotas([1, 0], 1000)
    order = SampleOrder([40, 7], weights=[3.0, 1.0], seed=0)
    picks = [order(t) for t in range(4000)]
    counts = collections.Counter(d for d, _ in picks)
    assert counts == {0: 3000, 1: 1000}
    small = [i for d, i in picks if d == 1]  # the small dataset repeats, each epoch a permutation
    for e in range(10):
        assert sorted(small[7 * e: 7 * e + 7]) == list(range(7))
    assert all(order.draw(t)[1] == sum(1 for u in range(t) if order.draw(u)[0] == order.draw(t)[0])
               for t in range(0, 300, 7))


def test_data_parallel_ranks_partition_the_stream():
    positions = [rank_position(c, r, 4) for r in range(4) for c in range(25)]
    assert sorted(positions) == list(range(100))


def test_remote_dataset_is_fetched_into_the_cache_lazily(tmp_path):
    remote = tmp_path / "bucket" / "ds"
    write_shards(remote, _samples(30), size_limit=4096)
    assert is_remote("s3://bucket/ds") and is_remote("gs://b/x") and not is_remote(str(remote))
    for url in ("http://127.0.0.1:8765/ds", "file:///data/ds"):
        with pytest.raises(ValueError, match=url.split(":")[0] + r":// is not a supported remote.*s3://"):
            is_remote(url)
    local = cache_dir_for("s3://bucket/ds", tmp_path / "cache")
    assert local.parent == tmp_path / "cache" and local.name.startswith("ds-")
    fetcher = ShardFetcher(str(remote), tmp_path / "cache" / "ds")  # a plain path: a local "remote"
    fetcher.fetch_index()
    reader = ShardReader(fetcher.local, fetch=fetcher)
    assert not list(fetcher.local.glob("shard.*"))  # nothing fetched before it is read
    assert reader[29]["id"] == "s29"
    assert len(list(fetcher.local.glob("shard.*"))) == 1
    assert [s["id"] for s in reader] == [f"s{i}" for i in range(30)]
    assert [p.name for p in fetcher.local.iterdir() if p.name.startswith(".")] == \
        [f".{reader.locate(29)[0]}.lock"]  # the last shard read stays pinned until the next fetch
    fetcher.release()
    assert not [p for p in fetcher.local.iterdir() if p.name.startswith(".")]  # no locks, no parts
    with pytest.raises(FileNotFoundError, match="index"):
        ShardFetcher(str(tmp_path / "nowhere"), tmp_path / "cache" / "x").fetch_index()


def test_open_dataset_finds_the_split_or_the_directory(tmp_path):
    write_shards(tmp_path / "a" / "train", _samples(3))
    write_shards(tmp_path / "b", _samples(4))
    assert len(open_dataset(tmp_path / "a", "train")) == 3
    assert len(open_dataset(tmp_path / "b", "train")) == 4
    with pytest.raises(FileNotFoundError, match="index.json"):
        open_dataset(tmp_path / "c", "train")
