"""NVLM-X and NVLM-H: gated cross-attention layers, their mask, training modes and checkpoints."""
import pytest
import torch
from mmpretrain.data.images import THUMBNAIL, ImagePatches
from mmpretrain.data.packing import pack_rows
from mmpretrain.data.sequence import build_sequence
from mmpretrain.parallel import cuda_to_cpu

from mmpretrain import checkpoint
from mmpretrain.config import Config, ConfigError, load
from mmpretrain.model.build import build_model
from mmpretrain.planner import params as P

PATCH, SEQ = 4, 64


class Tok:
    """Token ids of the special tokens the X/H layouts use; text maps to 100..149."""
    pad_id, bos_id, eos_id, img_id, img_break_id, img_end_id, image_marker_id = 0, 1, 2, 4, 5, 6, 7
    thumbnail_id = 8

    def tile_id(self, k):
        return 8 + k

    def encode(self, text):
        return [100 + ord(c) % 50 for c in text]


def config(design="x", **model):
    cfg = Config()
    cfg.vision.patch_size, cfg.vision.hidden_size, cfg.vision.ffn_hidden_size = PATCH, 32, 64
    cfg.decoder.hidden_size, cfg.decoder.ffn_hidden_size = 64, 96
    cfg.decoder.num_layers = 2
    cfg.data.seq_length = SEQ
    cfg.model.design = design
    cfg.model.cross_attention_layers = [1, 2] if design != "d" else []
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def build(cfg):
    torch.manual_seed(0)
    with cuda_to_cpu():
        return build_model(cfg, vocab_size=160, image_token_id=Tok.img_id)


def set_gates(model, value):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(value)


def image(grid, seed=0, tile=0):
    rows, cols = grid
    g = torch.Generator().manual_seed(seed * 1000 + rows * 100 + cols)
    return ImagePatches(torch.randn(rows * cols, 3 * PATCH * PATCH, generator=g), rows, cols, tile)


def sample(*segments):
    """Segments: a str is text, a (rows, cols) grid is an image."""
    segs, images = [], []
    for s in segments:
        if isinstance(s, str):
            segs.append({"text": s})
        else:
            segs.append({"image": len(images)})
            images.append(s)
    return {"segments": segs, "images": images}


def seq_x(*segments, seed=0):
    return build_sequence(sample(*segments), Tok(), lambda g: image(g, seed), 1, "x")


def tiles_of(grid, seed=0):
    """Two tiles and a thumbnail, each of `grid` patches."""
    return [image(grid, seed, 1), image(grid, seed + 1, 2), image(grid, seed + 2, THUMBNAIL)]


def seq_h(*segments, seed=0):
    return build_sequence(sample(*segments), Tok(), lambda g: tiles_of(g, seed), 1, "h")


def logits(model, batch):
    with cuda_to_cpu():
        return model(batch, with_loss=False)


def test_layouts_in_the_token_stream():
    x = seq_x("ab", (2, 2), "c")
    assert x.ids[3] == Tok.image_marker_id and x.ids.count(Tok.image_marker_id) == 1
    assert x.anchors == [3] and len(x) == 6
    h = seq_h("a", (2, 2), "b")
    # <s> a <tile_1> <tile_2> <thumbnail> [IMG] x 4 b </s>
    assert h.ids[2:5] == [9, 10, Tok.thumbnail_id] and h.ids[5:9] == [Tok.img_id] * 4
    assert h.anchors == [2, 3, 4]


def test_config_validates_cross_attention():
    with pytest.raises(ConfigError, match="cross_attention"):
        load(None, ["model.design=x"])
    with pytest.raises(ConfigError, match="resize=tiles"):
        load(None, ["model.design=h", "model.cross_attention_every=1"])
    with pytest.raises(ConfigError, match="parallel.pp > 1 needs data.max_patches"):
        load(None, ["model.design=x", "model.cross_attention_every=1", "parallel.pp=2"])
    load(None, ["model.design=x", "model.cross_attention_every=1", "parallel.pp=2",
                "data.max_patches=256", "train.recompute=full"])
    cfg = load(None, ["model.design=x", "model.cross_attention_every=2",
                      "model.cross_attention_layers=[2]", "decoder.num_layers=4"])
    from mmpretrain.config import cross_attention_positions
    assert cross_attention_positions(cfg) == [2, 4]  # the planner counts the same per stage


def test_cross_mask_own_sample_and_earlier_images():
    a, b = seq_x("ab", (2, 2), "cd", (1, 2), "e"), seq_x("f", (2, 1), "gh")
    batch = pack_rows([[a, b]], SEQ, 0)
    mask = batch.cross_attention_mask(torch.ones(3, dtype=torch.bool))[0, 0]  # [s, 4 + 2 + 2]
    sees = ~mask
    assert not sees[:3].any()  # before a's first marker (at 3)
    assert sees[3:6, :4].all() and not sees[3:6, 4:].any()  # a's first image only
    assert sees[6:len(a), :6].all() and not sees[6:len(a), 6:].any()  # a's two images
    start = len(a)
    assert not sees[start:start + 2].any()  # b before its marker
    assert sees[start + 2:start + len(b), 6:].all() and not sees[start:, :6].any()


def test_row_keys_match_the_dense_mask():
    a = seq_x("ab", (2, 2), "cd", (1, 2), "e")
    b, c = seq_x("fg", (2, 1), "h"), seq_x("ijk")
    batch = pack_rows([[a, b], [c], [b, a]], SEQ, 0)
    cross = torch.ones(len(batch.image_sizes), dtype=torch.bool)
    dense = batch.cross_attention_mask(cross)[:, 0]  # [b, s, k]
    index, rows = batch.cross_attention_rows(cross)  # [b, kr], [b, 1, s, kr]
    assert index.shape == (3, 8)  # rows 0 and 2 hold 4 + 2 + 2 image tokens, row 1 none
    for r in range(3):
        n = int((~dense[r]).any(0).sum())  # image tokens any token of row r sees
        keys = index[r, :n]
        assert torch.equal(rows[r, 0, :, :n], dense[r][:, keys])
        assert rows[r, 0, :, n:].all()  # padding keys are hidden
        others = torch.ones(dense.shape[-1], dtype=torch.bool)
        others[keys] = False
        assert dense[r][:, others].all()  # a row sees no other row's image


@torch.no_grad()
def test_keys_padded_to_a_multiple_change_nothing(megatron_world):
    """FP8 GEMMs take row counts in multiples of 16: the keys padded to 16 are hidden from every
    token, and the layer's output is the same."""
    model = build(config())
    set_gates(model, 1.0)
    a, b = seq_x("ab", (2, 2), "cd", (1, 2), "e"), seq_x("fg", (2, 1), "h")
    batch = pack_rows([[a, b], [b, a]], SEQ, 0)
    cross = ~model.in_stream(batch)
    index, mask = batch.cross_attention_rows(cross)  # kr = 8
    index16, mask16 = batch.cross_attention_rows(cross, multiple=16)
    assert index16.shape == (2, 16) and torch.equal(index16[:, :8], index)
    assert torch.equal(mask16[..., :8], mask) and mask16[..., 8:].all()
    with cuda_to_cpu():
        _, images = model.embed_and_context(batch)
        layer = model.language_model.cross_attention_1
        hidden = layer.input_layernorm(torch.randn(SEQ, 2, 64))
        out = layer.attend(hidden, images[index].transpose(0, 1), mask)
        out16 = layer.attend(hidden, images[index16].transpose(0, 1), mask16)
    torch.testing.assert_close(out16, out, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_no_earlier_image_gives_exactly_zero_cross_attention(megatron_world):
    model = build(config())
    set_gates(model, 1.0)
    seq = seq_x("abcd", (2, 2), "ef")
    batch = pack_rows([[seq]], SEQ, 0)
    with cuda_to_cpu():
        _, images = model.embed_and_context(batch)
        index, mask = batch.cross_attention_rows(~model.in_stream(batch))
        images = images[index].transpose(0, 1)  # [kr, 1, h]
        layer = model.language_model.cross_attention_1
        hidden = torch.randn(SEQ, 1, 64)
        out = layer.attend(layer.input_layernorm(hidden), images, mask)  # [s, 1, h]
    assert torch.equal(out[:5], torch.zeros_like(out[:5]))  # <s> a b c d: no image yet
    assert out[5:len(seq)].abs().sum() > 0 and torch.isfinite(out).all()


@torch.no_grad()
def test_gates_at_zero_equal_the_bare_decoder(megatron_world):
    x_model = build(config())
    d_model = build(config("d"))
    state = {k: v for k, v in x_model.state_dict().items() if "cross_attention_" not in k}
    d_model.load_state_dict(state)
    seqs = [seq_x("hello", (2, 2), "there"), seq_x("ab", (3, 2), "c", (2, 2), "de")]
    batch = pack_rows([seqs], SEQ, 0)
    text_only = pack_rows([seqs], SEQ, 0)
    text_only.image_sizes = text_only.image_sizes[:0]  # the same text, no images
    torch.testing.assert_close(logits(x_model, batch), logits(d_model, text_only), rtol=0, atol=0)
    # Nonzero gates change only tokens at or after an image.
    set_gates(x_model, 0.7)
    got, bare = logits(x_model, batch), logits(d_model, text_only)
    torch.testing.assert_close(got[0, :3], bare[0, :3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0, 3:len(seqs[0])], bare[0, 3:len(seqs[0])])


def test_gradients_reach_gates_then_cross_attention(megatron_world):
    model = build(config())
    batch = pack_rows([[seq_x("ab", (2, 2), "cdef"), seq_x("g", (2, 2), "hi")]], SEQ, 0)

    def grads():
        model.zero_grad()
        with cuda_to_cpu():
            loss = (model(batch) * batch.loss_mask).sum()
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if "cross_attention_" in n}

    first = grads()
    for name, g in first.items():
        assert torch.isfinite(g).all(), name
        assert (g.abs().sum() > 0) == name.endswith("_gate"), name
    with torch.no_grad():  # one SGD step: the gates open
        for n, p in model.named_parameters():
            if n.endswith("_gate"):
                p -= 1.0 * p.grad.sign()
    second = grads()
    for name, g in second.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name


@torch.no_grad()
def test_tokens_do_not_see_other_samples_or_later_images(megatron_world):
    model = build(config())
    set_gates(model, 1.0)
    a, b = seq_x("ab", (2, 2), "cd", (2, 2), "ef"), seq_x("g", (2, 2), "hi")
    base = pack_rows([[a, b]], SEQ, 0)
    second_image = pack_rows([[a, b]], SEQ, 0)
    second_image.patches[4:8] += 1.0  # a's second image, its marker at 6
    other_sample = pack_rows([[a, b]], SEQ, 0)
    other_sample.patches[8:] += 1.0  # b's image
    x = logits(model, base)
    y = logits(model, second_image)
    torch.testing.assert_close(x[0, :6], y[0, :6], rtol=0, atol=0)
    assert not torch.allclose(x[0, 6:len(a)], y[0, 6:len(a)])
    z = logits(model, other_sample)
    torch.testing.assert_close(x[0, :len(a)], z[0, :len(a)], rtol=0, atol=0)
    assert not torch.allclose(x[0, len(a):len(a) + len(b)], z[0, len(a):len(a) + len(b)])


def check_packed_equals_alone(model, seqs):
    set_gates(model, 0.8)
    packed = pack_rows([seqs[:2], seqs[2:]], SEQ, 0)
    got = logits(model, packed)
    for seq, (r, at) in zip(seqs, [(0, 0), (0, len(seqs[0])), (1, 0)]):
        alone = logits(model, pack_rows([[seq]], len(seq), 0))[0]
        torch.testing.assert_close(got[r, at:at + len(seq)], alone, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_packed_equals_each_sample_alone_x(megatron_world):
    check_packed_equals_alone(build(config()), [
        seq_x("hello", (2, 2), "there"), seq_x("abc", "de"), seq_x("", (4, 2), (2, 2), "xyz")])


@torch.no_grad()
def test_packed_equals_each_sample_alone_h(megatron_world):
    cfg = config("h")
    cfg.data.resize = "tiles"
    check_packed_equals_alone(build(cfg), [
        seq_h("hi", (2, 2), "yo", seed=1), seq_h("abc", "de"), seq_h("q", (2, 2), "z", seed=5)])


@torch.no_grad()
def test_h_thumbnail_in_stream_and_tiles_cross_attended(megatron_world):
    cfg = config("h")
    cfg.data.resize = "tiles"
    model = build(cfg)  # gates at 0: only the thumbnail (in the stream) can matter
    seq = seq_h("a", (2, 2), "bcd")
    base = logits(model, pack_rows([[seq]], SEQ, 0))
    tiles = pack_rows([[seq]], SEQ, 0)
    tiles.patches[:8] += 1.0  # the two regular tiles
    torch.testing.assert_close(logits(model, tiles), base, rtol=0, atol=0)
    thumb = pack_rows([[seq]], SEQ, 0)
    thumb.patches[8:] += 1.0
    assert not torch.allclose(logits(model, thumb), base)
    set_gates(model, 1.0)  # open gates: the tiles now reach the decoder
    assert not torch.allclose(logits(model, tiles), logits(model, pack_rows([[seq]], SEQ, 0)))


@pytest.mark.parametrize("freeze_projector", [False, True])
def test_train_only_cross_attention_freezes_the_rest(megatron_world, freeze_projector):
    cfg = config(train_only_cross_attention=True)
    cfg.projector.freeze = freeze_projector  # respected: only encoder and decoder are forced
    model = build(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name in (n for n, _ in model.named_parameters()):
        should = "cross_attention_" in name or (name.startswith("projector.") and not freeze_projector)
        assert (name in trainable) == should, name
    assert P.Trains.of(cfg).projector == (not freeze_projector)  # as the planner counts it


def test_frozen_decoder_on_x_is_flagged():
    from mmpretrain.config import advisories

    assert advisories(config()) == []
    frozen = config()
    frozen.decoder.freeze = True
    assert "model.train_only_cross_attention" in advisories(frozen)[0]
    frozen.model.train_only_cross_attention = True
    assert advisories(frozen) == []


def test_checkpoint_round_trip(megatron_world, tmp_path):
    cfg = config()
    model = build(cfg)
    set_gates(model, 0.3)
    with cuda_to_cpu():
        path = checkpoint.save_weights(tmp_path, 1, [model], cfg, "test")
        other = build(cfg)
        checkpoint.load_model(path, [other])
    for (name, p), q in zip(model.state_dict().items(), other.state_dict().values()):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), name
    assert float(other.language_model.cross_attention_1.cross_attn_attn_gate) == pytest.approx(0.3)


def test_gate_learning_rate_multiplier():
    from megatron.core.optimizer import OptimizerConfig

    from mmpretrain.train.optim import param_overrides
    cfg = config(cross_attention_gate_lr_mult=10.0)
    ocfg = OptimizerConfig(lr=cfg.train.lr, min_lr=cfg.train.min_lr)
    gate = [v for k, v in param_overrides(ocfg, cfg).items() if k.name == "*_gate"]
    assert gate == [{"max_lr": cfg.train.lr * 10, "min_lr": cfg.train.min_lr * 10, "lr_mult": 10.0}]
    assert not [k for k in param_overrides(ocfg, config("d")) if k.name == "*_gate"]


def test_pipeline_context_rows_round_trip_and_capacity():
    from mmpretrain.model.image_context import pack_context, unpack_context
    context = torch.randn(5, 8)
    rows = pack_context(context, capacity=7, micro_batch_size=2)  # ceil(7/2) = 4 rows
    assert rows.shape == (4, 2, 8) and torch.equal(unpack_context(rows, 5), context)
    assert torch.equal(rows.reshape(-1, 8)[5:], torch.zeros(3, 8))
    with pytest.raises(ValueError, match="over the pipeline's context capacity of 4"):
        pack_context(context, capacity=4, micro_batch_size=2)
