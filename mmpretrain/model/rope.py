"""Rotary position embeddings as megatron-core consumes them (angle tensors [s, b, 1, d]), and
for thd packed sequences, carried per token to the core attention."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.packed_seq_params import PackedSeqParams


def inv_freq(dim: int, theta: float) -> torch.Tensor:
    """[dim/2] frequencies 1/theta^(2i/dim)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def text_rope(position_ids: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Decoder RoPE from per-token positions [b, s] -> [s, b, 1, dim] (rotate-half layout)."""
    angles = position_ids.float()[..., None] * inv_freq(dim, theta).to(position_ids.device)  # [b, s, d/2]
    emb = torch.cat([angles, angles], dim=-1)  # [b, s, d]
    return emb.transpose(0, 1)[:, :, None, :]


def vision_rope(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Pixtral 2-D RoPE from patch (row, col) [n, 2] -> [n, 1, 1, dim] (interleaved pairs).

    Mistral's formula: frequencies 1/theta^(2i/dim); the first dim/4 rotation pairs turn with the
    row at the even frequencies, the last dim/4 with the column at the odd ones.
    """
    f = inv_freq(dim, theta).to(positions.device)  # [d/2]
    pos = positions.float()
    angles = torch.cat([pos[:, :1] * f[0::2], pos[:, 1:2] * f[1::2]], dim=-1)  # [n, d/2]
    emb = angles.repeat_interleave(2, dim=-1)  # [n, d]: pair j occupies dims 2j, 2j+1
    return emb[:, None, None, :]


@dataclass
class RopedSeqParams(PackedSeqParams):
    """thd packed sequences that carry each token's rotary angles `rope` [t, 1, 1, d].

    megatron-core applies RoPE to thd sequences one sequence at a time, with a host sync per
    sequence (`.tolist()`, `.item()`): per layer, per step, for every sample and image. Carried
    here instead, the angles are applied to the whole stream at once by the core attention
    (`RopeInCoreAttention`), and the block gets no `rotary_pos_emb`."""

    rope: torch.Tensor | None = None


def with_rope(packed: PackedSeqParams, rope: torch.Tensor) -> RopedSeqParams:
    """`packed` with per-token angles [t, 1, 1, d] attached."""
    return RopedSeqParams(**{f.name: getattr(packed, f.name) for f in fields(PackedSeqParams)},
                          rope=rope)


def rotate_carried(query: torch.Tensor, key: torch.Tensor, packed: PackedSeqParams | None,
                   interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """query [t, np, d] and key [t, ng, d] rotated by the angles `packed` carries, all tokens at
    once (Transformer Engine's fused kernel on a GPU where TE is installed, else megatron's own
    rotation); unchanged when it carries none."""
    rope = getattr(packed, "rope", None)
    if rope is None:
        return query, key
    fused = rope_utils.fused_apply_rotary_pos_emb if query.is_cuda else None  # TE's kernel

    def rotate(x):  # as sbhd [t, 1, n, d] with the angles [t, 1, 1, d] of each position
        if fused is not None:
            return fused(x[:, None], rope, interleaved=interleaved)[:, 0]
        return rope_utils._apply_rotary_pos_emb_bshd(x[:, None], rope,
                                                     rotary_interleaved=interleaved)[:, 0]
    return rotate(query), rotate(key)


class RopeInCoreAttention:
    """Core-attention mixin (first base): `rotate_carried`, then the attention."""

    def forward(self, query, key, value, attention_mask, *args, packed_seq_params=None, **kwargs):
        query, key = rotate_carried(query, key, packed_seq_params, self.config.rotary_interleaved)
        return super().forward(query, key, value, attention_mask, *args,
                               packed_seq_params=packed_seq_params, **kwargs)
