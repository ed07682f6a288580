"""Resize policies, patchify and normalisation, NVLM tiling, and the image placeholders in the
token stream (native rows and tile tags), truncation that never splits an image."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from mmpretrain.data.images import THUMBNAIL, ImagePatches, ImagePreparer, ImageSettings, tiled_patches
from mmpretrain.data.resize import MEAN, STD, native_size, normalize, patchify_uint8, resize, to_tensor
from mmpretrain.data.sequence import build_sequence, truncate, truncate_patches
from mmpretrain.data.tiling import candidate_grids, choose_grid, tile_tags
from PIL import Image
from test_packing import FakeTok


class TileTok(FakeTok):
    thumbnail_id = 30

    def tile_id(self, k):
        return 20 + k


def pixels(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_native_size_caps_budget_side_and_upscale():
    assert native_size(100, 200, 16, budget=1000, max_upscale=1.0) == (96, 192)
    h, w = native_size(1000, 2000, 16, budget=64)
    assert (h // 16) * (w // 16) <= 64 and h % 16 == 0 and w % 16 == 0 and w > h
    assert native_size(1000, 2000, 16, budget=4096, max_side=512) == (256, 512)
    assert native_size(20, 20, 16, budget=64, max_upscale=2.0) == (32, 32)
    h, w = native_size(1000, 3000, 16, budget=64, merge=2)
    assert h % 32 == 0 and w % 32 == 0
    assert native_size(10, 5000, 16, budget=16) == (16, 256)  # extreme aspect: one row of 16


def test_resize_matches_pillow_bicubic():
    src = pixels(300, 500)
    ours = resize(to_tensor(src), 120, 200)[0].permute(1, 2, 0).numpy().astype(int)
    ref = np.asarray(Image.fromarray(src).resize((200, 120), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(ours - ref).max() <= 2 and np.abs(ours - ref).mean() < 0.1


def test_patchify_and_normalize_layout():
    src = pixels(32, 48)
    grid = patchify_uint8(to_tensor(src), 16)  # [2, 3, 768]
    assert grid.shape == (2, 3, 3 * 16 * 16)
    want = src[16:32, 32:48].transpose(2, 0, 1).reshape(-1)  # patch (1, 2) in (c, y, x) order
    assert grid[1, 2].tolist() == want.tolist()
    norm = normalize(grid)
    ref = (src.astype(np.float32) / 255 - MEAN) / STD  # [h, w, 3]
    np.testing.assert_allclose(norm[1, 2].numpy(), ref[16:32, 32:48].transpose(2, 0, 1).reshape(-1),
                               atol=1e-5)


def test_grid_choice_follows_the_aspect_ratio():
    assert all(r * c <= 6 for r, c in candidate_grids(6)) and len(candidate_grids(6)) == 14
    assert choose_grid(448, 448, 448, 6) == (1, 1)  # small: not blown up to 2x2
    assert choose_grid(1000, 1000, 448, 6) == (2, 2)
    assert choose_grid(400, 800, 448, 6) == (1, 2)
    assert choose_grid(900, 300, 448, 6) == (3, 1)
    assert choose_grid(100, 2000, 448, 6) == (1, 6)
    assert choose_grid(100, 2000, 448, 1) == (1, 1)
    assert tile_tags(2, True) == ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"]
    assert tile_tags(1, True) == ["<tile_1>"]


def test_tiles_are_crops_of_the_resized_image_plus_a_thumbnail():
    s = ImageSettings(patch_size=16, token_budget=64, policy="tiles", max_tiles=4, tile_size=64)
    src = pixels(100, 210)
    parts = tiled_patches(src, s)  # grid (1, 2): aspect 2.1
    assert [p.tile for p in parts] == [1, 2, THUMBNAIL]
    assert all((p.rows, p.cols) == (4, 4) for p in parts)
    whole = patchify_uint8(resize(to_tensor(src), 64, 128), 16)  # [4, 8, 768]
    assert torch.equal(parts[1].patches, whole[:, 4:8].reshape(16, -1))
    thumb = patchify_uint8(resize(to_tensor(src), 64, 64), 16)
    assert torch.equal(parts[2].patches, thumb.reshape(16, -1))
    single = tiled_patches(pixels(40, 40), s)
    assert [p.tile for p in single] == [1]  # one tile: no thumbnail


def test_preparer_runs_both_policies_from_bytes():
    buf = io.BytesIO()
    Image.fromarray(pixels(90, 200)).save(buf, "PNG")
    native = ImagePreparer(ImageSettings(16, 24, decoder="pillow"))(buf.getvalue())
    assert isinstance(native, ImagePatches) and native.rows * native.cols <= 24
    tiles = ImagePreparer(ImageSettings(16, 24, policy="tiles", tile_size=32, max_tiles=3,
                                        decoder="pillow"))(buf.getvalue())
    assert [t.tile for t in tiles] == [1, 2, THUMBNAIL]
    with pytest.raises(ValueError, match="multiple"):
        ImagePreparer(ImageSettings(16, 24, merge=2, policy="tiles", tile_size=48))


def fake_tiles(n, side=2):
    parts = [ImagePatches(torch.zeros(side * side, 12), side, side, k + 1) for k in range(n)]
    return parts + ([ImagePatches(torch.zeros(side * side, 12), side, side, THUMBNAIL)] if n > 1 else [])


def test_tile_tags_and_placeholders_in_the_token_stream():
    tok = TileTok()
    sample = {"segments": [{"text": "ab"}, {"image": 0}, {"text": "c"}], "images": [2]}
    seq = build_sequence(sample, tok, fake_tiles)
    body = [21] + [4] * 4 + [22] + [4] * 4 + [30] + [4] * 4
    assert seq.ids == [1, *tok.encode("ab"), *body, *tok.encode("c"), 2]
    assert [i.tile for i in seq.images] == [1, 2, THUMBNAIL]
    assert seq.is_text == [False, True, True] + [False] * len(body) + [True, True]
    merged = build_sequence(sample, tok, fake_tiles, merge=2)
    assert merged.ids[3:9] == [21, 4, 22, 4, 30, 4]
    assert seq.spans == [(3, 3 + len(body), 3)]


def test_truncation_keeps_whole_tiled_images():
    tok = TileTok()
    sample = {"segments": [{"text": "ab"}, {"image": 0}, {"text": "c"}, {"image": 1}],
              "images": [2, 1]}
    seq = build_sequence(sample, tok, fake_tiles)  # 3 + 15 + 1 + 5 + 1 tokens
    cut = truncate(seq, 20, tok)  # inside the second image: it goes, whole
    assert len(cut) == 19 and len(cut.images) == 3 and cut.spans == seq.spans[:1]
    assert truncate(seq, 10, tok).images == [] and len(truncate(seq, 10, tok)) == 3
    by_patches = truncate_patches(seq, 13)  # 12 patches of image 0, 4 of image 1
    assert len(by_patches.images) == 3 and len(by_patches) == 19
    assert truncate_patches(seq, 16) is seq


def test_packing_normalises_the_uint8_stream_once():
    from mmpretrain.data.packing import pack_rows
    from mmpretrain.data.sequence import TokenSequence

    grid = patchify_uint8(to_tensor(pixels(32, 64)), 16).reshape(8, -1)  # [8, 768] uint8
    img = ImagePatches(grid, 2, 4)
    batch = pack_rows([[TokenSequence([4] * 8, [False] * 8, [img])]], 8, 0)
    assert batch.patches.dtype == torch.float32
    torch.testing.assert_close(batch.patches, normalize(grid))
    mixed = pack_rows([[TokenSequence([4] * 8, [False] * 8, [img]),
                        TokenSequence([4] * 8, [False] * 8, [ImagePatches(normalize(grid), 2, 4)])]],
                      16, 0)
    torch.testing.assert_close(mixed.patches, torch.cat([normalize(grid)] * 2))
