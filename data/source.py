"""Where samples come from: datasets (local or remote MDS shards) in one seeded global order, and
the step that turns the sample at a global position into a token sequence or a counted skip."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmpretrain.data.decode import ImageError
from mmpretrain.data.order import SampleOrder
from mmpretrain.data.remote import ShardFetcher, cache_dir_for, is_remote
from mmpretrain.data.sequence import SampleError, TokenSequence, build_sequence, truncate, truncate_patches
from mmpretrain.data.shards import ShardError, ShardReader
from streaming.base.format import get_index_basename


def open_dataset(path: str | Path, split: str = "train", cache_dir: str | Path = "",
                 cache_limit: int | str = 0) -> ShardReader:
    """The shards of `path`/`split`, or of `path` itself when it has no `split`/ directory.
    A remote `path` is read through the shard cache in `cache_dir`, of at most `cache_limit`."""
    path = str(path)
    if is_remote(path):
        return _open_remote(path.rstrip("/"), split, cache_dir, cache_limit)
    for candidate in (Path(path) / split, Path(path)):
        if (candidate / get_index_basename()).is_file():
            return ShardReader(candidate)
    raise FileNotFoundError(f"{path}: neither {Path(path) / split / get_index_basename()} nor "
                            f"{Path(path) / get_index_basename()} exists")


def _open_remote(remote: str, split: str, cache_dir: str | Path,
                 cache_limit: int | str = 0) -> ShardReader:
    errors = []
    for url in (f"{remote}/{split}", remote):
        fetcher = ShardFetcher(url, cache_dir_for(url, cache_dir), limit=cache_limit)
        try:
            fetcher.fetch_index()
        except FileNotFoundError as e:
            errors.append(str(e))
            continue
        return ShardReader(fetcher.local, fetch=fetcher)
    raise FileNotFoundError("; ".join(errors))


class SampleSource:
    """Datasets mixed by weight in a seeded global order; also indexable as their concatenation."""

    def __init__(self, readers: list[ShardReader], weights: list[float] | None = None, seed: int = 0,
                 shuffle: bool = True):
        self.readers = list(readers)
        self.order = SampleOrder([len(r) for r in self.readers], weights, seed, shuffle)
        self._starts = [sum(len(r) for r in self.readers[:k]) for k in range(len(self.readers))]

    def __len__(self) -> int:
        return sum(len(r) for r in self.readers)

    def __getitem__(self, index: int) -> dict:
        for k in range(len(self.readers) - 1, -1, -1):
            if index >= self._starts[k]:
                return self.readers[k][index - self._starts[k]]
        raise IndexError(index)

    def where(self, dataset: int, index: int) -> str:
        """'<dir>/<shard file> row <n>' of a sample, for messages."""
        reader = self.readers[dataset]
        name, row = reader.locate(index)
        return f"{reader.path / name} row {row}"


@dataclass
class Prepared:
    """The outcome for one global position: a sequence, or the reason it was skipped."""

    position: int
    key: tuple[int, int]  # (dataset, sample index)
    seq: TokenSequence | None
    skip: str | None = None  # metric reason when skipped
    message: str = ""
    truncated: bool = False


class SampleMaker:
    """Callable: global position -> Prepared. Picklable, so worker processes can run it."""

    def __init__(self, source: SampleSource, tok, prepare_image, merge: int, seq_len: int,
                 max_patches: int = 0, long_samples: str = "truncate", design: str = "d"):
        self.source, self.tok, self.prepare_image, self.merge = source, tok, prepare_image, merge
        self.seq_len, self.max_patches, self.long_samples = seq_len, max_patches, long_samples
        self.design = design  # image layout in the token stream: d, x or h

    def fit(self, seq: TokenSequence) -> tuple[TokenSequence | None, bool]:
        """(sequence within the limits or None to drop it, whether it was cut)."""
        over_patches = self.max_patches and seq.n_patches > self.max_patches
        if len(seq) <= self.seq_len and not over_patches:
            return seq, False
        if self.long_samples == "drop":
            return None, False
        cut = truncate(seq, self.seq_len, self.tok)
        if self.max_patches:
            cut = truncate_patches(cut, self.max_patches)
        return (cut if len(cut) >= 2 else None), True

    def sequence(self, sample: dict) -> tuple[TokenSequence | None, bool]:
        """A sample dict -> (fitted sequence or None when too long to keep, truncated?)."""
        return self.fit(build_sequence(sample, self.tok, self.prepare_image, self.merge,
                                       self.design))

    def __call__(self, position: int) -> Prepared:
        d, i = self.source.order(position)
        try:
            seq, cut = self.sequence(self.source.readers[d][i])
        except ShardError as e:  # its message names the shard and row already
            return Prepared(position, (d, i), None, e.reason, str(e))
        except (ImageError, SampleError) as e:
            return Prepared(position, (d, i), None, e.reason, f"{self.source.where(d, i)}: {e}")
        if seq is None:
            return Prepared(position, (d, i), None, "too_long",
                            f"{self.source.where(d, i)}: longer than {self.seq_len} tokens "
                            f"or {self.max_patches} patches")
        return Prepared(position, (d, i), seq, truncated=cut)
