"""Packing changes nothing: the packed encoder stream equals each image encoded alone, and packed
decoder rows give each sample the logits it gets alone."""
import torch
from mmpretrain.data.images import ImagePatches
from mmpretrain.data.packing import pack_rows
from mmpretrain.data.sequence import build_sequence
from mmpretrain.parallel import cuda_to_cpu
from test_packing import FakeTok, sample

from mmpretrain.config import Config
from mmpretrain.model.build import build_model

PATCH = 4


def tiny_model(merge: int = 1):
    cfg = Config()
    cfg.vision.patch_size, cfg.vision.hidden_size, cfg.vision.ffn_hidden_size = PATCH, 32, 64
    cfg.decoder.hidden_size, cfg.decoder.ffn_hidden_size = 64, 96
    cfg.projector.merge = merge
    cfg.data.seq_length = 64
    torch.manual_seed(0)
    with cuda_to_cpu():
        model = build_model(cfg, vocab_size=160, image_token_id=FakeTok.img_id)
    return model.eval()


def random_image(grid):
    rows, cols = grid
    g = torch.Generator().manual_seed(rows * 100 + cols)
    return ImagePatches(torch.randn(rows * cols, 3 * PATCH * PATCH, generator=g), rows, cols)


def seq_of(s, merge=1):
    return build_sequence(s, FakeTok(), random_image, merge)


@torch.no_grad()
def test_packed_encoder_equals_each_image_alone(megatron_world):
    model = tiny_model()
    seqs = [seq_of(sample("", [(2, 3), (4, 1)], "a")), seq_of(sample("b", [(3, 3)], "c"))]
    packed = pack_rows([seqs], 64, 0)
    with cuda_to_cpu():
        together = model.vision(packed.patches, packed.patch_positions,
                                packed.image_sizes)  # [n, h]
        at = 0
        for seq in seqs:
            for img in seq.images:
                alone_batch = pack_rows([[TokenSequenceOf(img)]], 64, 0)
                alone = model.vision(alone_batch.patches, alone_batch.patch_positions,
                                     alone_batch.image_sizes)
                n = img.rows * img.cols
                torch.testing.assert_close(together[at:at + n], alone, rtol=1e-5, atol=1e-5)
                at += n
    assert at == together.shape[0]


def TokenSequenceOf(img):
    from mmpretrain.data.sequence import TokenSequence
    return TokenSequence([FakeTok.img_id] * (img.rows * img.cols), [False] * (img.rows * img.cols),
                         [img])


@torch.no_grad()
def check_decoder_packing(merge):
    model = tiny_model(merge)
    seqs = [seq_of(sample("hello", [(2, 2)], "there"), merge), seq_of(sample("abc", [], "de"), merge),
            seq_of(sample("", [(4, 2), (2, 2)], "xyz"), merge)]
    packed = pack_rows([seqs[:2], seqs[2:]], 64, 0)
    with cuda_to_cpu():
        logits = model(packed, with_loss=False)  # [2, 64, v]
        losses = model(packed)  # [2, 64]
        rows = [(0, 0), (0, len(seqs[0])), (1, 0)]
        for seq, (r, at) in zip(seqs, rows):
            alone = pack_rows([[seq]], len(seq), 0)
            n = len(seq)
            torch.testing.assert_close(logits[r, at:at + n], model(alone, with_loss=False)[0],
                                       rtol=1e-4, atol=1e-4)
            m = alone.loss_mask[0].bool()
            torch.testing.assert_close(losses[r, at:at + n][m], model(alone)[0][m],
                                       rtol=1e-4, atol=1e-4)


def test_packed_decoder_equals_each_sample_alone(megatron_world):
    check_decoder_packing(merge=1)


def test_packed_decoder_with_patch_merge(megatron_world):
    check_decoder_packing(merge=2)


@torch.no_grad()
def test_images_change_only_their_own_sample(megatron_world):
    model = tiny_model()
    a, b = seq_of(sample("", [(2, 2)], "one")), seq_of(sample("", [(2, 2)], "two"))
    base = pack_rows([[a, b]], 64, 0)
    changed = pack_rows([[a, b]], 64, 0)
    changed.patches[4:] += 1.0  # the second sample's image
    with cuda_to_cpu():
        x, y = model(base, with_loss=False), model(changed, with_loss=False)
    torch.testing.assert_close(x[0, :len(a)], y[0, :len(a)])
    assert not torch.allclose(x[0, len(a):len(a) + len(b)], y[0, len(a):len(a) + len(b)])
