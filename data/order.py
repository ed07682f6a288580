"""The global sample order: a seeded mixture of datasets by weight, each dataset reshuffled per epoch.

Position t = 0, 1, 2, ... of the global stream names (dataset d, sample index i) in O(1):
- the dataset: the stream is cut into periods of P positions; dataset d holds quota[d] of them
  (quota proportional to its weight, largest remainders), in one seeded arrangement, so d's k-th
  draw and the position of any draw are plain arithmetic;
- the sample: d's k-th draw is sample perm_{d, epoch}(k mod N_d) with epoch = k // N_d, where perm
  is a seeded bijection of range(N_d) (a Feistel network with cycle walking: no table, any size).
Data-parallel rank r of R reads positions r, r + R, r + 2R, ...; ranks of one tensor/pipeline group
pass the same rank and read the same samples.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

_M64 = (1 << 64) - 1
ROUNDS = 4


def mix64(x: int) -> int:
    """SplitMix64's finaliser: a 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Permutation:
    """A seeded bijection of range(n), evaluated one index at a time."""

    def __init__(self, n: int, *seed: int):
        if n <= 0:
            raise ValueError(f"cannot permute {n} items")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # bits per Feistel half
        self.mask = (1 << self.half) - 1
        key = 0
        for s in seed:
            key = mix64(key ^ (s & _M64))
        self.keys = [mix64(key + r) for r in range(ROUNDS)]

    def _round_trip(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside range({self.n})")
        x = self._round_trip(i)
        while x >= self.n:  # cycle walking: stay inside range(n)
            x = self._round_trip(x)
        return x


def quotas(weights: list[float], period: int) -> list[int]:
    """Positions per period of each dataset: proportional to its weight, each at least 1."""
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"mixture weights must be positive, got {weights}")
    exact = [period * w / sum(weights) for w in weights]
    q = [int(e) for e in exact]
    for i in sorted(range(len(q)), key=lambda i: q[i] - exact[i])[:period - sum(q)]:
        q[i] += 1
    if min(q) == 0:
        raise ValueError(f"a mixture weight is below 1/{period} of the total: {weights}")
    return q


class SampleOrder:
    """Global position -> (dataset, sample index), for datasets of `sizes` mixed by `weights`."""

    def __init__(self, sizes: list[int], weights: list[float] | None = None, seed: int = 0,
                 shuffle: bool = True, period: int = 1000):
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"every dataset needs samples, got sizes {sizes}")
        self.sizes, self.seed, self.shuffle = list(sizes), seed, shuffle
        weights = weights or [1.0] * len(sizes)
        period = 1 if len(sizes) == 1 else period
        self.quota = quotas(weights, period)
        pattern = np.repeat(np.arange(len(sizes)), self.quota)
        if len(sizes) > 1:
            pattern = np.random.default_rng([seed, 0x6D6978]).permutation(pattern)
        self.pattern = pattern  # [P] dataset of each position in a period
        counts = np.zeros((len(pattern) + 1, len(sizes)), dtype=np.int64)
        counts[1:][np.arange(len(pattern)), pattern] = 1
        self.before = np.cumsum(counts, axis=0)  # [P + 1, D] draws of d before offset j
        self._perm = lru_cache(maxsize=16)(self._make_perm)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_perm"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._perm = lru_cache(maxsize=16)(self._make_perm)

    def _make_perm(self, d: int, epoch: int) -> Permutation:
        return Permutation(self.sizes[d], self.seed, d, epoch)

    def draw(self, t: int) -> tuple[int, int]:
        """(dataset, draw number within it) of global position t."""
        period, j = divmod(t, len(self.pattern))
        d = int(self.pattern[j])
        return d, period * self.quota[d] + int(self.before[j, d])

    def epoch(self, t: int, dataset: int = 0) -> int:
        """Epochs of `dataset` completed before position t."""
        period, j = divmod(t, len(self.pattern))
        return (period * self.quota[dataset] + int(self.before[j, dataset])) // self.sizes[dataset]

    def __call__(self, t: int) -> tuple[int, int]:
        """(dataset, sample index) at global position t."""
        d, k = self.draw(t)
        epoch, r = divmod(k, self.sizes[d])
        return d, (self._perm(d, epoch)(r) if self.shuffle else r)


def rank_position(local: int, dp_rank: int, dp_size: int) -> int:
    """Global position of a data-parallel rank's `local`-th read."""
    return local * dp_size + dp_rank
