"""Datasets on any remote that mosaicml-streaming supports (s3://, gs://, oci://, azure://, hf://,
sftp://, dbfs:, ...), read through a local shard cache.

The index is fetched when the dataset is opened (an unreachable index is an error at start, naming
it); each shard is fetched on first use. Several processes on a node may share one cache: a shard
is downloaded by whichever takes its lock file first, renamed into place when complete, and the
lock file is removed once the shard is there.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import urllib.parse
from pathlib import Path

from streaming.base.format import get_index_basename
from streaming.base.storage.download import DOWNLOADER_MAPPINGS, CloudDownloader

DEFAULT_CACHE = Path.home() / ".cache" / "mmpretrain" / "shards"


def is_remote(path: str) -> bool:
    """Whether `path` is a URL of a remote that streaming can download from."""
    scheme = urllib.parse.urlparse(path).scheme
    return bool(scheme) and "://" in path and scheme in DOWNLOADER_MAPPINGS


def cache_dir_for(remote: str, cache_root: str | Path = "") -> Path:
    """The local directory that caches `remote`: <cache root>/<last name>-<hash of the URL>."""
    digest = hashlib.sha1(remote.rstrip("/").encode()).hexdigest()[:12]
    name = remote.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    return Path(cache_root or DEFAULT_CACHE) / f"{name}-{digest}"


class ShardFetcher:
    """Callable(basename): makes `<local>/<basename>` present, downloading it from `remote`."""

    def __init__(self, remote: str, local: str | Path, timeout: float = 300.0):
        self.remote, self.local, self.timeout = remote.rstrip("/"), Path(local), timeout
        self._present: set[str] = set()

    def _download(self, name: str, to: Path) -> None:
        CloudDownloader.direct_download(f"{self.remote}/{name}", str(to), self.timeout)

    def fetch_index(self) -> None:
        """Fetch index.json afresh; a clear error naming it when it cannot be had."""
        self.local.mkdir(parents=True, exist_ok=True)
        name = get_index_basename()
        tmp = self.local / f".{name}.{os.getpid()}.part"
        try:
            self._download(name, tmp)
        except Exception as e:  # noqa: BLE001 - each cloud client raises its own types
            tmp.unlink(missing_ok=True)
            raise FileNotFoundError(f"{self.remote}/{name}: cannot fetch the MDS index: {e}") from None
        os.replace(tmp, self.local / name)

    def __call__(self, name: str) -> None:
        if name in self._present:
            return
        target = self.local / name
        if not target.is_file():
            lock_path = self.local / f".{name}.lock"
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not target.is_file():
                    part = self.local / f".{name}.{os.getpid()}.part"
                    try:
                        self._download(name, part)
                    except Exception as e:  # noqa: BLE001
                        part.unlink(missing_ok=True)
                        raise FileNotFoundError(f"{self.remote}/{name}: cannot fetch shard: {e}") from None
                    os.replace(part, target)
                lock_path.unlink(missing_ok=True)
        self._present.add(name)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_present": set()}
