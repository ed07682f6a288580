"""Packed (THD) attention for the local spec: each sequence of a packed stream attends only
within itself, at the cost of its own length squared instead of the stream's.

megatron-core describes packed sequences with `PackedSeqParams(qkv_format="thd", cu_seqlens...)`
and hands them to the core attention; its local `DotProductAttention` refuses them (only
Transformer Engine's attention takes them). `PackedDotProductAttention` takes them on any device:
the sequences are gathered into a padded batch [n_seq, L, heads, d] and attend through
`scaled_dot_product_attention` with a padding (and, for the decoder, causal) mask. Without
packed_seq_params it is megatron's dense-mask attention, unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from mmpretrain.data.packing import on_device
from mmpretrain.model.rope import rotate_carried


def packed_seq_params(lengths: torch.Tensor, device) -> PackedSeqParams:
    """THD description of sequences of `lengths` [n] (host memory) laid back to back: int32
    cu_seqlens on `device`, the longest length as an int (read on the host, no device sync)."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    longest = int(lengths.max()) if len(lengths) else 0
    cu = on_device(cu, device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def to_thd(x: torch.Tensor) -> torch.Tensor:
    """[s, b, ...] -> megatron's thd layout [b*s, 1, ...]: row after row."""
    return x.transpose(0, 1).reshape(-1, 1, *x.shape[2:])


def from_thd(x: torch.Tensor, b: int) -> torch.Tensor:
    """[b*s, 1, ...] -> [s, b, ...], the inverse of `to_thd`."""
    return x.reshape(b, -1, *x.shape[2:]).transpose(0, 1)


def padded_index(cu_seqlens: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [n_seq, L] into the packed tokens (0 at padding), valid [n_seq, L] bool), L the
    `longest` sequence's length."""
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    offsets = torch.arange(longest, device=cu_seqlens.device)  # [L]
    valid = offsets[None, :] < lengths[:, None]  # [n_seq, L]
    return torch.where(valid, starts[:, None] + offsets[None, :], 0), valid


def unpadded_index(cu_seqlens: torch.Tensor, longest: int, tokens: int) -> torch.Tensor:
    """[t] where each packed token sits in the padded [n_seq * L] layout (the inverse of
    `padded_index`), found without reading `cu_seqlens` on the host."""
    cu = cu_seqlens.long()
    t = torch.arange(tokens, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True)  # [t] sequence of each token
    return seq * longest + t - cu[seq]


class PackedDotProductAttention(DotProductAttention):
    """Core attention that also takes THD packed sequences (see the module docstring), rotated
    by the angles they carry (`rope.rotate_carried`)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSeqParams | None = None):
        """THD: query [t, np, d], key/value [t, ng, d] -> [t, np * d]."""
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias)
        if packed_seq_params.qkv_format != "thd" or attention_bias is not None:
            raise ValueError("PackedDotProductAttention takes thd packed sequences without bias")
        query, key = rotate_carried(query, key, packed_seq_params, self.config.rotary_interleaved)
        cu, longest = packed_seq_params.cu_seqlens_q, packed_seq_params.max_seqlen_q
        index, valid = padded_index(cu, longest)  # [n, L]
        heads, groups = query.shape[1], key.shape[1]
        q = query[index].transpose(1, 2)  # [n, np, L, d]
        k = key[index].transpose(1, 2).repeat_interleave(heads // groups, 1)  # [n, np, L, d]
        v = value[index].transpose(1, 2).repeat_interleave(heads // groups, 1)
        allowed = valid[:, None, None, :]  # [n, 1, 1, L] keys of the sequence itself
        if (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal:
            allowed = allowed & torch.ones_like(valid[0][:, None] & valid[0][None, :]).tril()
        dtype = torch.float32 if self.config.attention_softmax_in_fp32 else q.dtype
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), allowed,
                                             scale=self.softmax_scale)  # [n, np, L, d]
        out = out.to(query.dtype).transpose(1, 2).flatten(0, 1)  # [n*L, np, d]
        out = out.index_select(0, unpadded_index(cu, longest, query.shape[0]))  # [t, np, d]
        return out.reshape(out.shape[0], -1)
