"""Open a dataset directory (as `mmpretrain data synth` writes it) for training or evaluation."""
from __future__ import annotations

from pathlib import Path

from mmpretrain.config import Config, ConfigError
from mmpretrain.data.loader import ImageSettings, PackedLoader
from mmpretrain.data.shards import ShardReader
from mmpretrain.data.tokenizer import TextTokenizer


def open_tokenizer(cfg: Config) -> TextTokenizer:
    """The dataset's tokenizer; a clear error when the dataset is missing."""
    path = Path(cfg.data.path) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"data.path: no tokenizer.json in {cfg.data.path!r} "
                          f"(create a dataset with `mmpretrain data synth --out {cfg.data.path}`)")
    return TextTokenizer.load(path)


def image_settings(cfg: Config) -> ImageSettings:
    """The native-resolution image policy of this config."""
    return ImageSettings(cfg.vision.patch_size, cfg.data.image_token_budget,
                         cfg.projector.merge, cfg.data.max_upscale)


def make_loader(cfg: Config, split: str, tok: TextTokenizer, dp_rank: int = 0, dp_size: int = 1,
                shuffle: bool = True) -> PackedLoader:
    """A packed loader over `<data.path>/<split>`."""
    path = Path(cfg.data.path) / split
    if not path.is_dir():
        raise ConfigError(f"data.path: {cfg.data.path!r} has no {split}/ split")
    return PackedLoader(ShardReader(path), tok, image_settings(cfg), cfg.data.seq_length,
                        cfg.data.micro_batch_size, seed=cfg.data.shuffle_seed,
                        dp_rank=dp_rank, dp_size=dp_size, shuffle=shuffle)
