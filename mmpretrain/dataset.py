"""Open a dataset directory (as `mmpretrain data synth` or `data build` writes it) for training or
evaluation: the tokenizer, the image policy, the packing settings and the (mixture of) shards."""
from __future__ import annotations

from pathlib import Path

import torch

from mmpretrain.config import Config, ConfigError
from mmpretrain.data.images import ImageSettings
from mmpretrain.data.loader import PackedLoader, PackingSettings
from mmpretrain.data.source import open_dataset
from mmpretrain.data.tokenizer import TextTokenizer


def open_tokenizer(cfg: Config) -> TextTokenizer:
    """The dataset's tokenizer; a clear error when the dataset is missing."""
    path = Path(cfg.data.path) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"data.path: no tokenizer.json in {cfg.data.path!r} "
                          f"(create a dataset with `mmpretrain data synth --out {cfg.data.path}`)")
    return TextTokenizer.load(path)


def model_vocab_size(cfg: Config, tok: TextTokenizer) -> int:
    """The decoder's vocabulary: decoder.vocab_size (the rows past the tokenizer's ids are never
    read), else the tokenizer's size; a ConfigError when it has fewer rows than token ids."""
    rows = cfg.decoder.vocab_size
    if rows is None:
        return tok.vocab_size
    if rows < tok.vocab_size:
        raise ConfigError(f"decoder.vocab_size {rows} is smaller than the {tok.vocab_size} token ids "
                          f"of {cfg.data.path}/tokenizer.json: set at least {tok.vocab_size}, or "
                          f"null to take the tokenizer's size")
    return rows


def image_settings(cfg: Config) -> ImageSettings:
    """The image policy of this config (native resolution or NVLM tiles)."""
    d = cfg.data
    return ImageSettings(cfg.vision.patch_size, d.image_token_budget, cfg.projector.merge,
                         d.max_upscale, policy=d.resize, max_tiles=d.max_tiles,
                         tile_size=d.tile_size, thumbnail=d.tile_thumbnail, max_side=d.max_image_side,
                         max_pixels=d.max_image_pixels, decoder=d.decoder)


def packing_settings(cfg: Config) -> PackingSettings:
    """How this config packs sequences into micro-batches."""
    d = cfg.data
    return PackingSettings(d.pack_buffer, d.max_patches, d.long_samples)


MISSING = {"train": " (or list data.datasets; `mmpretrain data build --heldout-every K` writes "
                    "train/ and heldout/)",
           "heldout": " (train.eval_every: 0 trains without it; `mmpretrain data build "
                      "--heldout-every K` writes one)"}
"""What to do about a split that is not there."""


def _readers(cfg: Config, split: str) -> tuple[list, list[float] | None]:
    """The shard readers of `split` and their mixture weights (None: one dataset)."""
    if split == "train" and cfg.data.datasets:
        return ([_nonempty(open_dataset(ds.path, split, cfg.data.cache_dir, cfg.data.cache_limit),
                           f"data.datasets[{i}].path {ds.path!r}")
                 for i, ds in enumerate(cfg.data.datasets)],
                [ds.weight for ds in cfg.data.datasets])
    path = Path(cfg.data.path) / split
    if not path.is_dir():
        raise ConfigError(f"data.path: {cfg.data.path!r} has no {split}/ split{MISSING[split]}")
    return [_nonempty(open_dataset(path, split), f"data.path {cfg.data.path!r}")], None


def _nonempty(reader, where: str):
    """`reader`, unless it has no sample: a ConfigError naming `where`."""
    if len(reader) == 0:
        raise ConfigError(f"{where}: {reader.path} has no samples")
    return reader


def make_loader(cfg: Config, split: str, tok: TextTokenizer, dp_rank: int = 0, dp_size: int = 1,
                shuffle: bool = True, device_id: int | None = None,
                slots: int | None = None) -> PackedLoader:
    """A packed loader over `<data.path>/<split>`, or over the `data.datasets` mixture for train.
    `slots`: micro-batches per global batch, each packed from its own share of the samples (the
    training loop passes global_batch_size / micro_batch_size, so that the batches do not depend
    on dp_size); default dp_size, one per rank."""
    readers, weights = _readers(cfg, split)
    if device_id is None and cfg.data.workers == 0 and torch.cuda.is_available():
        device_id = torch.cuda.current_device()  # DALI's mixed decoder (not in forked workers)
    return PackedLoader(readers, tok, image_settings(cfg), cfg.data.seq_length,
                        cfg.data.micro_batch_size, seed=cfg.data.shuffle_seed, dp_rank=dp_rank,
                        dp_size=dp_size, shuffle=shuffle, packing=packing_settings(cfg),
                        workers=cfg.data.workers, weights=weights, device_id=device_id,
                        design=cfg.model.design, slots=slots)
