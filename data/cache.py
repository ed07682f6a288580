"""The local cache of remote datasets' shards: a size limit with least-recently-used eviction, safe
for the several processes of a node that share one cache directory.

Layout: `<root>/<dataset>/` per remote dataset (`remote.cache_dir_for`), holding its `index.json`,
its shard files and, per shard, transient dot files:
    .<shard>.lock       flock'ed: shared while a process reads the shard (a pin), exclusive while
                        one downloads or evicts it; removed by its last holder
    .<shard>.reserve    the shard's indexed size, reserved in the cache while it downloads
    .<shard>.<pid>.part the download in progress, renamed into place when complete
and `<root>/.lock` (flock'ed exclusively to count, evict and reserve: one process at a time) and
`<root>/.stats.json` (shards and bytes fetched and evicted on this node, for metrics).

The limit covers everything under the root's dataset directories: shard files, indexes (never
evicted) and the reservations of downloads in progress, so the files on disk never exceed it. A
process that must download a shard takes the root lock, counts, evicts unpinned shards (oldest
mtime first; a shard is touched each time it is pinned) until the shard's indexed size fits,
writes its reservation, lets the root lock go and downloads; it renames the complete file into
place and drops the reservation under the root lock again, so a count never misses a download
that ends meanwhile. A shard whose lock cannot be taken exclusively at once is in use (pinned by
a reader, or downloading) and is skipped. When nothing more can be evicted the process waits for
pins to go (up to `wait` seconds), then fails naming `data.cache_limit` and the sizes. An index is
downloaded outside the cache and copied in under the root lock once there is room. Lock order: a
shard's lock, then the root lock, under which shard locks are only tried, never waited for, so
processes cannot deadlock.

Why a pinned shard is safe, and why unpinned reads would not be: streaming's `MDSReader` opens a
shard file by name for every sample (open, seek, read, close; no mmap, no descriptor kept). On
Linux, unlinking a file removes its name only: a descriptor already open keeps reading the same,
complete inode until it is closed, and eviction only ever unlinks (a re-fetch writes a new inode
and renames it into place), so a read that has opened the file is never harmed. The window that
matters is between a fetch making the file present and the reader's open(): there an eviction
would make open() fail. A reader therefore pins the shard (shared flock on its lock file) from the
fetch until its next fetch; evictors need the lock exclusively and skip pinned shards.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from streaming.base.format import get_index_basename

log = logging.getLogger(__name__)

SETTING = "data.cache_limit"
STATS_KEYS = ("fetched_shards", "fetched_bytes", "evicted_shards", "evicted_bytes")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)


class CacheLimitError(ValueError):
    """The cache limit is too small for what has to be in the cache at once (a setting to change:
    the CLI reports it as a bad input, exit 2)."""


def parse_size(value: int | str | None, key: str = SETTING) -> int:
    """Bytes of a size given as an int or a string like '200GB', '1.5 TiB', '512mb', '1000000'
    (1 KB = 1024 bytes, as in mosaicml-streaming); '' / None / 0: no limit (0)."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise ValueError(f"{key}: {value!r} is not a size")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{key}: {value!r} is negative")
        return int(value)
    m = _SIZE.match(str(value))
    if not m or (m.group(3) and m.group(3).lower() == "ib" and not m.group(2)):
        raise ValueError(f"{key}: {value!r} is not a size (bytes, or a number with KB, MB, GB, TB, PB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: int) -> str:
    """'64.0 MiB (67108864 bytes)'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


# ---------------------------------------------------------------- lock files


def lock_file(path: Path, mode: int, block: bool = True) -> int | None:
    """A descriptor of `path` (created if missing) flock'ed in `mode` (LOCK_SH or LOCK_EX), or None
    when `block` is False and another process holds a conflicting lock. Lock files are removed by
    their last holder (`unlock`), so after locking, the descriptor is checked to still be the file
    at `path`; if that file was removed meanwhile, the new one is taken instead."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, mode if block else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            mine = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            mine = False
        if mine:
            return fd
        os.close(fd)


def unlock(fd: int, path: Path) -> None:
    """Release a lock of `lock_file`, removing the lock file if no one else holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (a failed conversion drops our lock too)
    except BlockingIOError:
        pass
    else:  # held by us alone: anyone waiting on this file will find it gone and take a new one
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
    finally:
        os.close(fd)


def lock_path(directory: str | Path, shard: str) -> Path:
    return Path(directory) / f".{shard}.lock"


def reserve_path(directory: str | Path, shard: str) -> Path:
    return Path(directory) / f".{shard}.reserve"


def part_path(directory: str | Path, shard: str) -> Path:
    return Path(directory) / f".{shard}.{os.getpid()}.part"


# ---------------------------------------------------------------- the cache


@dataclass
class _Scan:
    """What the cache holds, counted under the root lock."""

    usage: int = 0  # bytes of every file plus the reservations of downloads in progress
    fixed: int = 0  # bytes that cannot be evicted: indexes
    shards: list[tuple[int, str, str, int]] = field(default_factory=list)  # (mtime_ns, dir, name, size)
    downloading: int = 0  # bytes reserved by downloads in progress


class ShardCache:
    """The cache root shared by the datasets under it: its limit (bytes, 0: none), counting,
    eviction, reservations and the node's fetch/eviction counters."""

    def __init__(self, root: str | Path, limit: int | str = 0, wait: float = 60.0):
        self.root, self.limit, self.wait = Path(root), parse_size(limit), wait
        self._warned = False

    # -------------------------------------------------------------- root lock and counters

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the root lock (one process counts, evicts or reserves at a time)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def stats(self) -> dict[str, int]:
        """Shards and bytes fetched into and evicted from this cache (every process of the node)."""
        try:
            data = json.loads((self.root / ".stats.json").read_text())
        except (OSError, ValueError):
            data = {}
        return {k: int(data.get(k, 0)) for k in STATS_KEYS}

    def _add_stats(self, **counts: int) -> None:
        """Add to the counters; the caller holds the root lock."""
        data = self.stats()
        for k, v in counts.items():
            data[k] += v
        tmp = self.root / f".stats.json.{os.getpid()}"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.root / ".stats.json")

    def commit(self, part: Path, target: Path, reservation: Path | None) -> None:
        """Rename a complete download into place and drop its reservation in one step under the
        root lock, so that a count sees either the reservation or the shard, never neither."""
        with self.locked():
            os.replace(part, target)
            if reservation is not None:
                reservation.unlink(missing_ok=True)
            self._add_stats(fetched_shards=1, fetched_bytes=target.stat().st_size)

    # -------------------------------------------------------------- counting and eviction

    def scan(self) -> _Scan:
        """Count the cache; the caller holds the root lock. Removes the reservations and partial
        files of downloads whose process is gone."""
        out, index = _Scan(), get_index_basename()
        try:
            dirs = [d.path for d in os.scandir(self.root) if d.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return out
        for d in dirs:
            leftovers: dict[str, list[str]] = {}  # shard -> its reservation / partial files
            for e in os.scandir(d):
                name = e.name
                if name.startswith("."):
                    shard = _shard_of(name, index)
                    if shard:
                        leftovers.setdefault(shard, []).append(e.path)
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                out.usage += st.st_size
                if name == index:
                    out.fixed += st.st_size
                else:
                    out.shards.append((st.st_mtime_ns, d, name, st.st_size))
            for shard, paths in leftovers.items():
                self._count_download(d, shard, paths, out)
        return out

    def _count_download(self, d: str, shard: str, paths: list[str], out: _Scan) -> None:
        """A download in progress holds its shard's lock exclusively: count its reservation; if
        no one does, its files are left over from a killed process: remove them."""
        fd = lock_file(lock_path(d, shard), fcntl.LOCK_SH, block=False)
        if fd is None:  # downloading (or evicted/released this instant: counting it is safe)
            reserve = reserve_path(d, shard)
            if str(reserve) in paths:
                with contextlib.suppress(OSError, ValueError):
                    size = int(reserve.read_text() or 0)
                    out.usage += size
                    out.downloading += size
            return
        try:
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        finally:
            unlock(fd, lock_path(d, shard))

    def evict(self, d: str, name: str, size: int) -> bool:
        """Remove one shard unless a process holds its lock; the caller holds the root lock."""
        lock = lock_path(d, name)
        fd = lock_file(lock, fcntl.LOCK_EX, block=False)
        if fd is None:
            return False
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(d, name))
        finally:
            unlock(fd, lock)
        log.debug("shard cache: evicted %s (%d bytes)", os.path.join(d, name), size)
        return True

    def _make_room(self, size: int, what: str) -> tuple[bool, _Scan, int, int]:
        """Evict least recently used shards until `size` more bytes fit; the caller holds the
        root lock. (whether it fits, the scan, shards and bytes evicted)"""
        scan = self.scan()
        if size + scan.fixed > self.limit:
            raise CacheLimitError(
                f"{SETTING}: {human(self.limit)} cannot hold {what} ({human(size)}) besides the "
                f"indexes in {self.root} ({human(scan.fixed)}); raise {SETTING} (to at least one "
                "shard of each dataset for every process that reads this cache at once)")
        over, shards, freed = scan.usage + size - self.limit, 0, 0
        for _, d, name, n in sorted(scan.shards):
            if over - freed <= 0:
                break
            if self.evict(d, name, n):
                shards, freed = shards + 1, freed + n
        if shards:
            self._add_stats(evicted_shards=shards, evicted_bytes=freed)
            if not self._warned:
                self._warned = True
                log.info("shard cache %s reached its limit of %s: evicting least recently used "
                         "shards (counted in data/cache_evicted_*)", self.root, human(self.limit))
        return over - freed <= 0, scan, shards, freed

    def reserve(self, d: Path, shard: str, size: int) -> Path:
        """Make room for `shard` (`size` bytes, its indexed size) and reserve it; the caller holds
        the shard's lock exclusively and removes the returned reservation file when done."""
        deadline, delay = time.monotonic() + self.wait, 0.01
        while True:
            with self.locked():
                fits, scan, _, freed = self._make_room(size, f"shard {d / shard}")
                if fits:
                    reservation = reserve_path(d, shard)
                    reservation.write_text(str(size))
                    return reservation
            if time.monotonic() >= deadline:
                in_use = scan.usage - freed - scan.fixed - scan.downloading
                raise CacheLimitError(
                    f"{SETTING}: no room for shard {d / shard} ({human(size)}) in {self.root} "
                    f"(limit {human(self.limit)}) after waiting {self.wait:g} s: "
                    f"{human(in_use)} are shards that processes are reading, {human(scan.downloading)} "
                    f"downloads in progress, {human(scan.fixed)} indexes. The limit must hold one "
                    "shard of each dataset for every process reading this cache at once (ranks on "
                    f"the node x max(1, data.workers)) plus the downloads; raise {SETTING}")
            time.sleep(delay)
            delay = min(2 * delay, 0.5)

    def admit(self, src: Path, dest: Path) -> None:
        """Copy the complete file `src` (an index, downloaded outside the cache) into place as
        `dest`, under the root lock and, when there is a limit, after making room for it."""
        with self.locked():
            size = src.stat().st_size
            if self.limit:
                fits, _, _, _ = self._make_room(size, f"the index {dest}")
                if not fits:
                    raise CacheLimitError(
                        f"{SETTING}: no room for the index {dest} ({human(size)}) in {self.root} "
                        f"(limit {human(self.limit)}): every shard there is in use; raise {SETTING}")
            part = part_path(dest.parent, dest.name)
            try:
                shutil.copyfile(src, part)
                os.replace(part, dest)
            finally:
                part.unlink(missing_ok=True)

    def check_fits(self, remote: str, sizes: dict[str, int], index_bytes: int) -> None:
        """At open: a clear error when the limit cannot hold the dataset's largest shard and index."""
        if not self.limit or not sizes:
            return
        name = max(sizes, key=lambda k: sizes[k])
        if sizes[name] + index_bytes > self.limit:
            raise CacheLimitError(
                f"{SETTING}: {human(self.limit)} is smaller than the largest shard of {remote} "
                f"({name}: {human(sizes[name])}) plus its index ({human(index_bytes)}); raise "
                f"{SETTING} (to at least one shard of each dataset for every process that reads "
                "this cache at once) or write smaller shards (`mmpretrain data build --shard-size`)")


def _shard_of(dotname: str, index: str) -> str | None:
    """The shard a reservation or partial file belongs to (None: a lock file or an index's part)."""
    if dotname.endswith(".reserve"):
        return dotname[1:-len(".reserve")]
    if ".part" in dotname:
        shard = dotname[1:].rsplit(".part", 1)[0].rsplit(".", 1)[0]  # .<shard>.<pid>.part[.tmp]
        return None if shard == index else shard
    return None
