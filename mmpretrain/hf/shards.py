"""Weight files: safetensors shards with an index (written), and HF weights read lazily.

Reading takes safetensors (single file or index). A pickle-based `.bin` runs arbitrary code when
loaded, so it is refused unless the caller trusts it, and then loaded with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mmpretrain.hf import ConversionError

INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ConversionError(f"--shard-size {text!r}: expected a size such as 5GB or 500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def shard_name(i: int, n: int) -> str:
    """The transformers file name of shard i (0-based) of n."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_shards(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive items into shards of at most `limit` bytes (an item larger alone stays alone)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def write_index(out: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """model.safetensors.index.json: which shard holds each tensor."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, with the metadata transformers expects."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------- reading


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """`safetensors.safe_open`; a damaged or truncated file is a ConversionError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as h:
            yield h
    except SafetensorError as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e}); truncated by an "
                              f"interrupted download or copy?") from None


class WeightReader:
    """The tensors of an HF model directory, read one at a time."""

    def __init__(self, directory: str | Path, trust_pickle: bool = False):
        self.dir = Path(directory)
        self.files = self._safetensors()
        self.pickled: dict[str, torch.Tensor] | None = None
        if self.files is None:
            self.pickled = self._pickle(trust_pickle)
            self.files = {}

    def _safetensors(self) -> dict[str, Path] | None:
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.dir / f for name, f in weight_map.items()}
        files = sorted(self.dir.glob("*.safetensors"))
        out: dict[str, Path] = {}
        for f in files:
            with open_safetensors(f) as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out or None

    def _pickle(self, trust: bool) -> dict[str, torch.Tensor]:
        files = sorted(self.dir.glob("*.bin"))
        if not files:
            raise ConversionError(f"{self.dir}: no *.safetensors or *.bin weights")
        if not trust:
            raise ConversionError(f"{self.dir}: weights are pickle files ({files[0].name}); loading "
                                  f"a pickle can run arbitrary code. Convert them to safetensors or "
                                  f"pass --trust-pickle")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            try:  # zip-format files map lazily; legacy ones load whole
                out.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            except RuntimeError:
                out.update(torch.load(f, map_location="cpu", weights_only=True))
        return out

    def names(self) -> list[str]:
        """All tensor names."""
        return list(self.pickled) if self.pickled is not None else list(self.files)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk now."""
        if self.pickled is not None:
            return self.pickled[name]
        with open_safetensors(self.files[name]) as h:
            return h.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape without reading it."""
        if self.pickled is not None:
            return tuple(self.pickled[name].shape)
        with open_safetensors(self.files[name]) as h:
            return tuple(h.get_slice(name).get_shape())

