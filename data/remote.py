"""Datasets on any remote that mosaicml-streaming supports (s3://, gs://, oci://, azure://, hf://,
sftp://, dbfs:, ...), read through a local shard cache.

The index is fetched when the dataset is opened (an unreachable index is an error at start, naming
it); each shard is fetched on first use. Several processes on a node may share one cache: a shard
is downloaded by whichever takes its lock file first, to a private `.part` file renamed into place
when complete. The cache may have a size limit (`data.cache_limit`): least recently used shards
that no process is reading or downloading are evicted to make room, and fetched again when read
again. See `cache.py` for the locks, the eviction order and why a reader is never harmed.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import urllib.parse
from pathlib import Path

from mmpretrain.data.cache import (
    STATS_KEYS,
    CacheLimitError,
    ShardCache,
    lock_file,
    lock_path,
    part_path,
    unlock,
)
from streaming.base.format import get_index_basename
from streaming.base.storage.download import DOWNLOADER_MAPPINGS, CloudDownloader

DEFAULT_CACHE = Path.home() / ".cache" / "mmpretrain" / "shards"

__all__ = ["CacheLimitError", "ShardFetcher", "cache_dir_for", "cache_metrics", "is_remote"]


def is_remote(path: str) -> bool:
    """Whether `path` is a URL of a remote that streaming can download from; a URL of any other
    scheme (http://, file://) is a ValueError naming the ones it can."""
    scheme = urllib.parse.urlparse(path).scheme
    if not scheme or "://" not in path:
        return False
    if scheme not in DOWNLOADER_MAPPINGS:
        raise ValueError(f"{path}: {scheme}:// is not a supported remote; datasets stream from "
                         f"{', '.join(s + '://' for s in sorted(DOWNLOADER_MAPPINGS) if s)} "
                         "or a local path")
    return True


def cache_dir_for(remote: str, cache_root: str | Path = "") -> Path:
    """The local directory that caches `remote`: <cache root>/<last name>-<hash of the URL>."""
    digest = hashlib.sha1(remote.rstrip("/").encode()).hexdigest()[:12]
    name = remote.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    return Path(cache_root or DEFAULT_CACHE) / f"{name}-{digest}"


class _Pin:
    """A shared lock on a shard's lock file, held from its fetch until the same thread's next
    fetch: the shard cannot be evicted while its sample is opened and read."""

    __slots__ = ("name", "fd", "path", "pid")

    def __init__(self, name: str, fd: int, path: Path):
        self.name, self.fd, self.path, self.pid = name, fd, path, os.getpid()

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        if self.pid == os.getpid():
            unlock(fd, self.path)
        else:  # inherited over fork: the lock is the parent's; closing our copy leaves it alone
            os.close(fd)

    def __del__(self):
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # releases the lock (in the process that took it)


class ShardFetcher:
    """Callable(basename): makes `<local>/<basename>` present, downloading it from `remote`, and
    pins it until this thread's next call. `local`'s parent is the cache root: every dataset
    cached under it shares `limit` (bytes or a string like '200GB'; 0: none)."""

    def __init__(self, remote: str, local: str | Path, timeout: float = 300.0,
                 limit: int | str = 0, wait: float = 60.0):
        self.remote, self.local, self.timeout = remote.rstrip("/"), Path(local), timeout
        self.cache = ShardCache(self.local.parent, limit, wait)
        self.sizes: dict[str, int] = {}  # shard basename -> bytes, from the index
        self._base = self.cache.stats()  # metrics count from here
        self._tls, self._pid = threading.local(), os.getpid()

    def _download(self, name: str, to: Path) -> None:
        CloudDownloader.direct_download(f"{self.remote}/{name}", str(to), self.timeout)

    def fetch_index(self) -> None:
        """Fetch index.json afresh; a clear error naming it when it cannot be had, or when the
        cache limit cannot hold its largest shard."""
        self.local.mkdir(parents=True, exist_ok=True)
        name = get_index_basename()
        with tempfile.TemporaryDirectory(prefix="mmpretrain-index-") as tmpdir:
            tmp = Path(tmpdir) / name  # outside the cache: it enters it only once there is room
            try:
                self._download(name, tmp)
            except Exception as e:  # noqa: BLE001 - each cloud client raises its own types
                raise FileNotFoundError(f"{self.remote}/{name}: cannot fetch the MDS index: {e}") from None
            sizes = _shard_sizes(tmp)
            self.cache.check_fits(self.remote, sizes, tmp.stat().st_size)
            self._drop_changed(_shard_entries(self.local / name), _shard_entries(tmp))
            self.cache.admit(tmp, self.local / name)
        self.sizes = sizes

    def _drop_changed(self, old: dict[str, str], new: dict[str, str]) -> None:
        """Remove the cached shards whose index entry changed at the remote (a dataset rebuilt at
        the same URL): they would be read against the new index. An error if one is in use."""
        for name in (n for n in old if old[n] != new.get(n)):
            with self.cache.locked():
                size = (self.local / name).stat().st_size if (self.local / name).is_file() else 0
                if not self.cache.evict(str(self.local), name, size):
                    raise RuntimeError(f"{self.remote}/{name} changed at the remote, but its cached "
                                       f"copy {self.local / name} is being read by another process "
                                       "(a job on this node reading the old version); retry after it")

    def __call__(self, name: str) -> None:
        pin = self._pin()
        if pin is not None:
            if pin.name == name:
                return
            self.release()
        self._tls.pin = self._acquire(name)

    def _pin(self) -> _Pin | None:
        if self._pid != os.getpid():  # a forked child: its parent's pins are not its own
            self._tls, self._pid = threading.local(), os.getpid()
        return getattr(self._tls, "pin", None)

    def release(self) -> None:
        """Unpin this thread's shard (it may then be evicted)."""
        pin = self._pin()
        if pin is not None:
            self._tls.pin = None
            pin.release()

    def _acquire(self, name: str) -> _Pin:
        """Pin `name`, fetching it first when it is not (or no longer) in the cache."""
        target, lock = self.local / name, lock_path(self.local, name)
        while True:
            fd = lock_file(lock, fcntl.LOCK_SH)
            if target.is_file():  # pinned: no process can evict it now
                with contextlib.suppress(OSError):
                    os.utime(target)  # most recently used
                return _Pin(name, fd, lock)
            unlock(fd, lock)
            fd = lock_file(lock, fcntl.LOCK_EX)
            try:
                if not target.is_file():
                    self._fetch(name, target)
            finally:
                unlock(fd, lock)

    def _fetch(self, name: str, target: Path) -> None:
        """Download `name` into place; the caller holds its lock exclusively."""
        if not self.sizes and (self.local / get_index_basename()).is_file():
            self.sizes = _shard_sizes(self.local / get_index_basename())
        size = self.sizes.get(name)
        if size is None and self.cache.limit:
            raise FileNotFoundError(f"{self.remote}/{name}: not a shard of "
                                    f"{self.local / get_index_basename()}")
        part = part_path(self.local, name)
        for p in (part, Path(f"{part}.tmp")):  # a killed process with our pid may have left them
            p.unlink(missing_ok=True)
        reservation = self.cache.reserve(self.local, name, size) if self.cache.limit else None
        try:
            try:
                self._download(name, part)
            except Exception as e:  # noqa: BLE001
                raise FileNotFoundError(f"{self.remote}/{name}: cannot fetch shard: {e}") from None
            got = part.stat().st_size
            if size is not None and got != size:
                raise ValueError(f"{self.remote}/{name}: fetched {got} bytes, the index says {size}")
            self.cache.commit(part, target, reservation)
        finally:
            part.unlink(missing_ok=True)
            if reservation is not None:
                reservation.unlink(missing_ok=True)

    def metrics(self) -> dict[str, int]:
        """`data/cache_{fetched,evicted}_{shards,bytes}`: in this fetcher's cache root since it was
        made, by every process sharing the cache (the node's)."""
        now = self.cache.stats()
        return {f"data/cache_{k}": now[k] - self._base[k] for k in STATS_KEYS}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_tls", "_pid")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tls, self._pid = threading.local(), os.getpid()


def _shard_entries(index_file: Path) -> dict[str, str]:
    """Shard basename -> its index entry (as canonical JSON); {} when there is no readable index."""
    try:
        shards = json.loads(index_file.read_text())["shards"]
        return {s["raw_data"]["basename"]: json.dumps(s, sort_keys=True) for s in shards}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _shard_sizes(index_file: Path) -> dict[str, int]:
    """Shard basename -> bytes from an MDS index ({} when it cannot be read: the reader that opens
    it names the problem)."""
    try:
        shards = json.loads(index_file.read_text())["shards"]
        return {s["raw_data"]["basename"]: int(s["raw_data"]["bytes"]) for s in shards}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def cache_metrics(readers) -> dict[str, int]:
    """The cache counters of the remote datasets among `readers` (ShardReaders), summed over
    their cache roots; {} when none is remote."""
    by_root: dict[Path, dict[str, int]] = {}
    for r in readers:
        fetch = getattr(r, "fetch", None)
        if isinstance(fetch, ShardFetcher) and fetch.cache.root not in by_root:
            by_root[fetch.cache.root] = fetch.metrics()
    out: dict[str, int] = {}
    for m in by_root.values():
        for k, v in m.items():
            out[k] = out.get(k, 0) + v
    return out
