"""The data section of the config: the dataset mixture (a list of sections), image and packing
options, their checks, and a resolved config that round-trips."""
from __future__ import annotations

import pytest

from mmpretrain import config as C
from mmpretrain.config import ConfigError, load


def test_dataset_mixture_is_a_checked_list_of_sections(tmp_path):
    cfg = load(None, ["data.datasets=[{path: /a, weight: 3}, {path: s3://b/c}]"])
    assert [(d.path, d.weight) for d in cfg.data.datasets] == [("/a", 3.0), ("s3://b/c", 1.0)]
    assert isinstance(cfg.data.datasets[0], C.DatasetConfig)
    C.dump(cfg, tmp_path / "config.yaml")
    assert load(tmp_path / "config.yaml") == cfg
    for bad, key in [("{path: /a}", r"data\.datasets"), ("[{path: /a, wieght: 2}]", r"datasets\[0\]\.wieght"),
                     ("[{path: /a, weight: heavy}]", r"datasets\[0\]\.weight"),
                     ("[{path: /a, weight: 0}]", r"datasets\[0\]")]:
        with pytest.raises(ConfigError, match=key):
            load(None, [f"data.datasets={bad}"])


def test_image_and_packing_options_are_checked():
    cfg = load(None, ["data.resize=tiles", "data.tile_size=448", "data.max_tiles=12",
                      "data.long_samples=drop", "data.decoder=dali", "data.workers=2"])
    assert (cfg.data.resize, cfg.data.max_tiles, cfg.data.decoder) == ("tiles", 12, "dali")
    for sets, key in [(["data.resize=tiled"], "data.resize"), (["data.max_tiles=13"], "max_tiles"),
                      (["data.resize=tiles", "data.tile_size=100"], "tile_size"),
                      (["data.resize=tiles", "projector.merge=2", "data.tile_size=48"], "tile_size"),
                      (["data.long_samples=split"], "long_samples"), (["data.decoder=cv2"], "decoder"),
                      (["data.workers=-1"], "workers"), (["data.pack_buffer=0.5"], "pack_buffer")]:
        with pytest.raises(ConfigError, match=key):
            load(None, sets)
