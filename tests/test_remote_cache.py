"""The remote shard cache's size limit (data.cache_limit): least-recently-used eviction of shards no
process reads, never past the limit, safe for processes sharing one cache; clear errors when the
limit is too small. The "remote" is a plain directory, downloaded by streaming's local downloader."""
from __future__ import annotations

import os
import random
import time

import pytest
from forked import forked_map
from mmpretrain.data.cache import CacheLimitError, parse_size
from mmpretrain.data.remote import ShardFetcher, cache_metrics
from mmpretrain.data.shards import ShardReader, write_shards
from test_shards import _samples

N = 60


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """(remote directory of N samples in ~4 KB shards, shard sizes, index bytes)."""
    path = tmp_path_factory.mktemp("bucket") / "ds"
    write_shards(path, _samples(N), size_limit=4096)
    sizes = {p.name: p.stat().st_size for p in path.glob("shard.*.mds")}
    assert len(sizes) >= 8
    return path, sizes, (path / "index.json").stat().st_size


def disk_usage(root) -> int:
    """Bytes of the shards, indexes and partial downloads under the cache root (what the limit
    covers; lock and reservation files hold no data)."""
    total = 0
    for d, _, files in os.walk(root):
        if d == str(root):
            continue
        for f in files:
            if not f.endswith((".lock", ".reserve")):
                try:
                    total += os.stat(os.path.join(d, f)).st_size
                except FileNotFoundError:
                    pass
    return total


def open_cached(remote_dir, root, limit, name="ds", wait=60.0):
    fetcher = ShardFetcher(str(remote_dir), root / name, limit=limit, wait=wait)
    fetcher.fetch_index()
    return fetcher, ShardReader(fetcher.local, fetch=fetcher)


def test_limited_cache_reads_everything_and_never_exceeds_the_limit(remote, tmp_path):
    path, sizes, index = remote
    limit = index + 3 * max(sizes.values())
    fetcher, reader = open_cached(path, tmp_path / "cache", limit)
    downloads, peak = [], 0
    download = fetcher._download

    def checked_download(name, to):  # the whole shard is on disk before its rename
        nonlocal peak
        download(name, to)
        downloads.append(name)
        peak = max(peak, disk_usage(tmp_path / "cache"))

    fetcher._download = checked_download
    expected = _samples(N)
    order = list(range(N))
    random.Random(0).shuffle(order)
    for i in order + order[::-1]:  # shuffled, then back: evicted shards are fetched again
        assert reader[i] == expected[i]
        peak = max(peak, disk_usage(tmp_path / "cache"))
        assert (fetcher.local / "index.json").is_file()  # never evicted
    assert peak <= limit
    assert len(downloads) > len(sizes) and set(downloads) == set(sizes)
    m = cache_metrics([reader])
    assert m["data/cache_fetched_shards"] == len(downloads)
    assert m["data/cache_fetched_bytes"] == sum(sizes[n] for n in downloads)
    kept = len(list(fetcher.local.glob("shard.*")))
    assert m["data/cache_evicted_shards"] == len(downloads) - kept
    fetcher.release()
    assert not [p.name for p in fetcher.local.iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_pinned_shard_is_not_evicted_and_a_full_cache_is_a_clear_error(remote, tmp_path):
    """A process reading a shard pins it; another that needs room waits, then fails naming the
    setting and the sizes; once the pin goes, the shard is evicted and the other proceeds."""
    path, sizes, index = remote
    big = max(sizes, key=sizes.get)
    root = tmp_path / "cache"
    limit = 2 * index + sizes[big] + sizes[big] // 2  # one such shard, for two datasets
    fa, a = open_cached(path, root, limit, "a", wait=0.3)
    fb, b = open_cached(path, root, limit, "b", wait=0.3)
    j = next(i for i in range(N) if a.locate(i)[0] == big)
    assert a[j]["id"] == f"s{j}"  # a pins its copy of the largest shard
    t0 = time.monotonic()
    with pytest.raises(CacheLimitError, match=r"data\.cache_limit: no room for shard .*bytes.*reading"):
        b[j]
    assert time.monotonic() - t0 >= 0.3 and (fa.local / big).is_file()
    fa.release()
    assert b[j]["id"] == f"s{j}" and not (fa.local / big).exists()  # evicted once unpinned
    fb.release()
    assert a[j]["id"] == f"s{j}" and not (fb.local / big).exists()  # fetched again
    assert disk_usage(root) <= limit


def test_too_small_a_limit_is_an_error_at_start(remote, tmp_path):
    path, sizes, index = remote
    with pytest.raises(CacheLimitError, match=r"data\.cache_limit: .* smaller than the largest shard"
                                              r".*shard\.\d+\.mds.*bytes"):
        open_cached(path, tmp_path / "cache", max(sizes.values()) + index - 1)
    with pytest.raises(ValueError, match=r"data\.cache_limit: 'lots' is not a size"):
        ShardFetcher(str(path), tmp_path / "cache" / "x", limit="lots")
    assert [parse_size(v) for v in ("", "0", 0, "200GB", "1.5 KiB", "512mb", "1000")] == \
        [0, 0, 0, 200 << 30, 1536, 512 << 20, 1000]


def test_leftovers_of_a_killed_download_are_removed_and_not_counted(remote, tmp_path):
    path, sizes, index = remote
    fetcher, reader = open_cached(path, tmp_path / "cache", index + 2 * max(sizes.values()))
    (fetcher.local / ".shard.00003.mds.999999.part").write_bytes(b"x" * 3000)
    (fetcher.local / ".shard.00003.mds.reserve").write_text(str(10 ** 9))  # no one holds its lock
    assert [reader[i]["id"] for i in range(N)] == [f"s{i}" for i in range(N)]
    fetcher.release()
    assert not [p.name for p in fetcher.local.iterdir() if p.name.startswith(".")]


def _read_all(args):
    """In a child process: read every sample of the shared cache twice in a seeded order, checking
    the cache against the limit after each read; (samples wrong, most bytes seen)."""
    path, root, limit, seed = args
    fetcher, reader = open_cached(path, root, limit)
    expected, order = _samples(N), list(range(N))
    rng, wrong, peak = random.Random(seed), 0, 0
    for _ in range(2):
        rng.shuffle(order)
        for i in order:
            wrong += reader[i] != expected[i]
            peak = max(peak, disk_usage(root))
    return wrong, peak


def test_processes_share_a_limited_cache(remote, tmp_path):
    path, sizes, index = remote
    limit = index + 3 * max(sizes.values())  # each process: one shard read or downloading
    results = forked_map(_read_all, [(path, tmp_path / "cache", limit, s) for s in range(3)])
    assert [w for w, _ in results] == [0, 0, 0]
    assert max(p for _, p in results) <= limit
    stats = ShardFetcher(str(path), tmp_path / "cache" / "ds").cache.stats()
    assert stats["evicted_shards"] > 0 and stats["fetched_shards"] >= len(sizes)


def test_the_config_limit_reaches_the_cache(remote, tmp_path, monkeypatch):
    import mmpretrain.data.source as source

    from mmpretrain.config import from_dict
    from mmpretrain.dataset import _readers

    path, sizes, index = remote
    monkeypatch.setattr(source, "is_remote", lambda p: True)  # the plain directory as a remote
    data = {"datasets": [{"path": str(path)}], "cache_dir": str(tmp_path / "cache"),
            "cache_limit": "100KB"}
    (reader,), _ = _readers(from_dict({"data": data}), "train")
    assert reader.fetch.cache.limit == 100 << 10 and reader.fetch.cache.root == tmp_path / "cache"
    assert reader[N - 1]["id"] == f"s{N - 1}"
    with pytest.raises(CacheLimitError, match=r"data\.cache_limit"):
        _readers(from_dict({"data": {**data, "cache_limit": "1KB"}}), "train")


def test_a_dataset_rebuilt_at_the_same_url_is_not_read_from_stale_shards(tmp_path):
    """The cached shards whose index entry changed are dropped when the index is fetched again;
    the unchanged ones stay; a changed shard another reader still pins is a clear error."""
    remote_dir = tmp_path / "bucket" / "ds"
    write_shards(remote_dir, _samples(30), size_limit=4096)
    fetcher, old = open_cached(remote_dir, tmp_path / "cache", 0)
    assert [old[i]["id"] for i in range(30)] == [f"s{i}" for i in range(30)]
    cached = {p.name: p.read_bytes() for p in fetcher.local.glob("shard.*.mds")}
    changed = _samples(30)
    changed[-1]["segments"][0]["text"] = "rebuilt"  # only the last shard differs
    rebuilt = tmp_path / "bucket" / "new"
    write_shards(rebuilt, changed, size_limit=4096)
    os.rename(remote_dir, tmp_path / "bucket" / "old")
    os.rename(rebuilt, remote_dir)
    last = old.locate(29)[0]
    with pytest.raises(RuntimeError, match=f"{last} changed at the remote.*being read"):
        open_cached(remote_dir, tmp_path / "cache", 0)  # `old` still pins the last shard
    fetcher.release()
    fetcher, new = open_cached(remote_dir, tmp_path / "cache", 0)
    kept = {p.name for p in fetcher.local.glob("shard.*.mds")}
    assert kept == set(cached) - {last}
    assert all((fetcher.local / n).read_bytes() == cached[n] for n in kept)
    assert new[29]["segments"][0]["text"] == "rebuilt" and new[0] == old[0]
