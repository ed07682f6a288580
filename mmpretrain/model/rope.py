"""Rotary position embeddings as megatron-core consumes them: angle tensors [s, b, 1, d]."""
from __future__ import annotations

import torch


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
