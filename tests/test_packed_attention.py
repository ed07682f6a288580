"""Packed (thd) attention equals megatron's dense-mask attention: the core attention alone
(causal and bidirectional, grouped queries), and the whole vision encoder, outputs and gradients."""
import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from mmpretrain.data.packing import pack_rows
from mmpretrain.data.sequence import TokenSequence
from mmpretrain.parallel import cuda_to_cpu
from test_model_packing import random_image, tiny_model

from mmpretrain.model.packed_attention import PackedDotProductAttention, packed_seq_params
from mmpretrain.model.specs import transformer_config

LENGTHS = [5, 1, 9, 3]


def block_mask(lengths: list[int], causal: bool) -> torch.Tensor:
    """[1, 1, t, t] True = hidden: other sequences (and, if causal, later tokens)."""
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = seq[:, None] == seq[None, :]
    if causal:
        allowed &= torch.ones_like(allowed).tril()
    return ~allowed[None, None]


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask])
def test_packed_core_attention_equals_dense_mask(megatron_world, mask_type):
    cfg = transformer_config(num_layers=1, hidden_size=64, num_attention_heads=4,
                             num_query_groups=2, ffn_hidden_size=64, norm_eps=1e-5,
                             init_std=0.02, dtype=torch.float32, tp=1, pp=1)
    args = dict(config=cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    with cuda_to_cpu():
        packed, dense = PackedDotProductAttention(**args), DotProductAttention(**args)
    t = sum(LENGTHS)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(t, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(t, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(t, 2, 16, generator=g, requires_grad=True)
    out = packed(q, k, v, None, packed_seq_params=packed_seq_params(torch.tensor(LENGTHS), q.device))
    ref = dense(q[:, None], k[:, None], v[:, None],
                block_mask(LENGTHS, mask_type == AttnMaskType.causal))[:, 0]  # [t, np*d]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_vision_encoder_packed_equals_dense_mask(megatron_world):
    model = tiny_model().train()
    images = [random_image(g) for g in [(2, 3), (4, 1), (3, 3), (1, 1)]]
    seqs = [TokenSequence([1] * (i.rows * i.cols), [False] * (i.rows * i.cols), [i]) for i in images]
    batch = pack_rows([seqs], 64, 0)
    with cuda_to_cpu():
        outs = []
        for mask in (None, batch.encoder_attention_mask()):
            model.zero_grad()
            out = model.vision(batch.patches, batch.patch_positions, batch.image_sizes, mask)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            outs.append((out.detach(), {n: p.grad.clone() for n, p in model.vision.named_parameters()}))
    (packed, packed_grads), (dense, dense_grads) = outs
    torch.testing.assert_close(packed, dense, rtol=1e-5, atol=1e-5)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
