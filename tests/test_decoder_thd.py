"""The decoder's packed samples as thd sequences (PackedSeqParams, megatron's [b*s, 1, h] layout)
equal the dense block-diagonal causal mask: D, X and H, loss and every gradient, from the same
weights; and the thd description itself."""
import pytest
import torch
from mmpretrain.data.packing import pack_rows
from mmpretrain.parallel import cuda_to_cpu
from test_cross_attention import SEQ, build, config, seq_h, seq_x, set_gates

from mmpretrain.config import ConfigError, check_trainable, decoder_thd


def test_decoder_seqlens_are_the_runs_of_one_sample():
    rows = [[seq_x("hello", (2, 2), "there"), seq_x("abc", "de")], [seq_x("", (4, 2), "xyz")]]
    batch = pack_rows(rows, SEQ, 0)
    a, b, c = (len(s) for s in rows[0] + rows[1])
    assert batch.decoder_seqlens().tolist() == [a, b, SEQ - a - b, c, SEQ - c]
    # positions restart with every run, the padding's included: one RoPE table serves thd
    for row, lengths in zip(batch.position_ids, ([a, b, SEQ - a - b], [c, SEQ - c])):
        assert row.tolist() == [i for n in lengths for i in range(n)]
    full = pack_rows([[seq_x("ab" * 40)]], len(seq_x("ab" * 40)), 0)
    assert full.decoder_seqlens().tolist() == [full.tokens.shape[1]]


def loss_and_grads(model, batch, thd: bool):
    model.thd = thd
    model.zero_grad()
    with cuda_to_cpu():
        loss = model(batch)  # [b, s]
    (loss * batch.loss_mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def batches(design):
    if design == "h":
        seqs = [seq_h("hi", (2, 2), "yo", seed=1), seq_h("abc", "de"), seq_h("q", (2, 2), "z", seed=5)]
    else:
        seqs = [seq_x("hello", (2, 2), "there"), seq_x("abc", "de"), seq_x("", (4, 2), (2, 2), "xyz")]
    if design == "d":  # the D layout of the same samples: image tokens in the stream
        from test_model_packing import seq_of
        from test_packing import sample
        seqs = [seq_of(sample("hello", [(2, 2)], "there")), seq_of(sample("abc", [], "de")),
                seq_of(sample("", [(4, 2), (2, 2)], "xyz"))]
    return pack_rows([seqs[:2], seqs[2:]], SEQ, 0)


@pytest.mark.parametrize("design", ["d", "x", "h"])
def test_thd_equals_dense_mask(megatron_world, design):
    cfg = config(design)
    if design == "h":
        cfg.data.resize = "tiles"
    if design == "d":
        cfg.vision.patch_size = 4
    model = build(cfg).train()
    set_gates(model, 0.5)  # open gates: the cross-attention layers matter
    batch = batches(design)
    assert len(batch.decoder_seqlens()) > batch.tokens.shape[0]  # several runs per row
    dense, dense_grads = loss_and_grads(model, batch, thd=False)
    packed, packed_grads = loss_and_grads(model, batch, thd=True)
    torch.testing.assert_close(packed, dense, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == dense_grads.keys() and len(dense_grads) > 10
    for name, grad in dense_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_spec_and_packing_choices_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("checks the choices of a machine without CUDA")
    cfg = config("d")
    assert not decoder_thd(cfg, "local")  # auto: the dense mask with the local spec
    cfg.model.packed_attention = "thd"
    assert decoder_thd(cfg, "local")
    assert decoder_thd(config("d"), "te")
    cfg.model.packed_attention = "mask"
    with pytest.raises(ConfigError, match="packed_attention.*model.spec local"):
        decoder_thd(cfg, "te")
    check_trainable(config("d"))  # auto: the local spec here
    cfg = config("d", spec="te")
    with pytest.raises(ConfigError, match="model.spec: 'te' needs Transformer Engine on CUDA: "
                                          "CUDA is not available"):
        check_trainable(cfg)
    cfg = config("d")
    cfg.train.fp8 = "hybrid"
    with pytest.raises(ConfigError, match="train.fp8: 'hybrid' runs on Transformer Engine layers "
                                          r"\(model.spec te\), and this run has the local spec"):
        check_trainable(cfg)
