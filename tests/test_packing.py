"""Token sequences, truncation, packing, the masks derived from a packed batch, the loader."""
import pytest
import torch
from mmpretrain.data.images import ImagePatches
from mmpretrain.data.packing import RowPacker, pack_rows
from mmpretrain.data.sequence import TokenSequence, build_sequence, image_placeholder, truncate


class FakeTok:
    pad_id, bos_id, eos_id, img_id, img_break_id, img_end_id = 0, 1, 2, 4, 5, 6

    def encode(self, text):
        return [100 + ord(c) % 50 for c in text]


def fake_image(rows, cols, fill=0.0):
    return ImagePatches(torch.full((rows * cols, 3 * 4 * 4), fill), rows, cols)


def sample(text_before, image_grids, text_after):
    segs = ([{"text": text_before}] if text_before else [])
    segs += [{"image": i} for i in range(len(image_grids))]
    segs += [{"text": text_after}]
    return {"segments": segs, "images": image_grids}


def build(s):
    return build_sequence(s, FakeTok(), lambda grid: fake_image(*grid))


def test_placeholder_layout():
    assert image_placeholder(2, 3, 4, 5, 6) == [4, 4, 4, 5, 4, 4, 4, 6]


def test_sequence_marks_only_text_as_targets():
    seq = build(sample("ab", [(2, 2)], "cd"))
    t = FakeTok()
    assert seq.ids[0] == t.bos_id and seq.ids[-1] == t.eos_id
    for tok, is_text in zip(seq.ids, seq.is_text):
        assert is_text == (tok not in (t.bos_id, t.img_id, t.img_break_id, t.img_end_id))
    assert len(seq.images) == 1


def test_truncate_drops_a_cut_image_whole():
    seq = build(sample("ab", [(1, 2), (3, 3)], "cd"))  # <s> a b [I I E] [I I I B I I I B I I I E] c d </s>
    cut = truncate(seq, 10, FakeTok())
    assert cut.ids == seq.ids[:6]  # bos, 2 text, first image (3 tokens); the second is cut off
    assert len(cut.images) == 1
    assert truncate(seq, 100, FakeTok()) is seq


def test_pack_rows_labels_positions_and_loss_mask():
    a, b = build(sample("ab", [], "c")), build(sample("", [(1, 1)], "de"))
    batch = pack_rows([[a, b]], seq_len=16, pad_id=0)
    na, nb = len(a), len(b)
    ids = batch.tokens[0]
    assert ids[:na].tolist() == a.ids and ids[na:na + nb].tolist() == b.ids
    assert (ids[na + nb:] == 0).all()
    assert batch.position_ids[0, :na].tolist() == list(range(na))
    assert batch.position_ids[0, na:na + nb].tolist() == list(range(nb))
    assert batch.sample_ids[0].tolist() == [0] * na + [1] * nb + [-1] * (16 - na - nb)
    # Targets: next token of the same sample, counted only when it is text.
    assert batch.labels[0, :na - 1].tolist() == a.ids[1:]
    want = a.is_text[1:] + [False] + b.is_text[1:] + [False] + [False] * (16 - na - nb)
    assert batch.loss_mask[0].bool().tolist() == want
    assert batch.loss_mask[0, na - 1] == 0  # never predict across a sample boundary
    assert batch.image_sizes.tolist() == [[1, 1]]


def test_decoder_mask_is_block_diagonal_causal():
    a, b = build(sample("ab", [], "")), build(sample("c", [], ""))
    batch = pack_rows([[a, b]], seq_len=10, pad_id=0)
    m = batch.decoder_attention_mask()[0, 0]  # True = masked
    sid = batch.sample_ids[0]
    for i in range(10):
        for j in range(10):
            allowed = j <= i and sid[i] == sid[j]
            assert bool(m[i, j]) == (not allowed)


def test_encoder_mask_and_patch_positions():
    seq = build(sample("", [(2, 3), (1, 2)], "x"))
    batch = pack_rows([[seq]], seq_len=32, pad_id=0)
    assert batch.image_cu_seqlens.tolist() == [0, 6, 8]
    pos = batch.patch_positions
    assert pos[:6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert pos[6:].tolist() == [[0, 0], [0, 1]]
    m = batch.encoder_attention_mask()[0, 0]
    assert not m[:6, :6].any() and not m[6:, 6:].any()
    assert m[:6, 6:].all() and m[6:, :6].all()


@pytest.mark.parametrize("merge", [1, 2, 3])
def test_patch_positions_and_merge_order_per_image(merge):
    """The vectorised positions and merge order against the image-by-image reference (the HF
    export's pixel shuffle, written with a loop), on random grids."""
    from mmpretrain.hf.nvlm_layers import pixel_shuffle
    from mmpretrain.model.projector import merge_patches

    gen = torch.Generator().manual_seed(merge)
    grids = [(merge * int(r), merge * int(c)) for r, c in torch.randint(1, 6, (7, 2), generator=gen)]
    batch = pack_rows([[build(sample("", grids, "x"))]], seq_len=1024, pad_id=0)
    expected = torch.cat([torch.cartesian_prod(torch.arange(r), torch.arange(c)) for r, c in grids])
    assert torch.equal(batch.patch_positions, expected)
    features = torch.randn(len(expected), 5, generator=gen)
    assert torch.equal(merge_patches(features, batch.image_sizes, merge),
                       pixel_shuffle(features, grids, merge))
    empty = pack_rows([[build(sample("abc", [], "x"))]], seq_len=16, pad_id=0)
    assert empty.patch_positions.shape == (0, 2)
    assert merge_patches(torch.zeros(0, 5), empty.image_sizes, merge).shape == (0, 5 * merge * merge)


def test_row_packer_fills_rows_in_order_and_flushes():
    seqs = [TokenSequence([1] * n, [True] * n) for n in (5, 4, 6, 3, 7)]
    packer = RowPacker(seq_len=10, rows_per_batch=2, pad_id=0)
    out = [packer.add(s) for s in seqs]
    # rows: [5, 4] | [6, 3] -> batch when 7 arrives; 7 waits for the next batch.
    assert [o is not None for o in out] == [False, False, False, False, True]
    assert out[-1].sample_ids.tolist()[0][:9] == [0] * 5 + [1] * 4
    last = packer.flush()
    assert last.tokens.shape == (2, 10) and int((last.sample_ids[0] == 0).sum()) == 7
    assert (last.sample_ids[1] == -1).all()
    assert packer.flush() is None


def test_best_subset_fills_exactly_when_it_can():
    from mmpretrain.data.bestfit import best_subset

    assert best_subset([5, 9, 3, 4], 12) == [1, 2]  # 9 + 3: the earliest exact fill
    assert sum([7, 7, 7][i] for i in best_subset([7, 7, 7], 20)) == 14
    assert best_subset([30, 40], 10) == [] and best_subset([], 10) == []


def test_best_fit_packer_rows_budget_and_order():
    from mmpretrain.data.bestfit import BestFitPacker

    seqs = [TokenSequence([1] * n, [True] * n, [fake_image(1, p)] if p else [])
            for n, p in ((6, 4), (5, 0), (4, 0), (5, 4), (3, 4), (1, 0), (9, 0))]
    packer = BestFitPacker(seq_len=10, rows=2, pad_id=0, buffer_tokens=30, max_patches=8)
    for k, s in enumerate(seqs):
        packer.add(k, s)
    assert packer.full
    batch = packer.pop_batch()
    rows = [[int(x) for x in batch.sample_ids[r].unique() if x >= 0] for r in range(2)]
    assert (batch.sample_ids >= 0).sum() == 20  # both rows filled exactly
    assert batch.tokens[0, 0] == 1 and int((batch.sample_ids[0] == 0).sum()) == 6  # the oldest first
    assert batch.patches.shape[0] <= 8  # two of the three 4-patch samples at most
    assert len(packer.pending) == 7 - sum(len(r) for r in rows)
    with pytest.raises(ValueError, match="fits no"):
        packer.add(99, TokenSequence([1] * 11, [True] * 11))
