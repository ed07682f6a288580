"""Pixtral-style vision encoder over one packed stream of images at native resolution."""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mmpretrain.model.rope import vision_rope
from mmpretrain.model.specs import vision_layer_spec


class VisionEncoder(MegatronModule):
    """Patch embedding -> RMSNorm -> transformer with 2-D RoPE; no final norm (Pixtral)."""

    def __init__(self, config: TransformerConfig, patch_size: int, rope_theta: float):
        super().__init__(config)
        self.rope_theta = rope_theta
        # A stride-p conv on patches is a linear map of the flattened (c, y, x) patch.
        self.patch_embed = torch.nn.Linear(3 * patch_size * patch_size, config.hidden_size,
                                           bias=False, dtype=config.params_dtype)
        self.ln_pre = torch.nn.RMSNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                       dtype=config.params_dtype)
        self.block = TransformerBlock(config, vision_layer_spec(), post_layer_norm=False)
        torch.nn.init.normal_(self.patch_embed.weight, std=config.init_method_std)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """patches [n, 3*p*p], positions [n, 2], mask [1, 1, n, n] -> features [n, h]."""
        x = self.ln_pre(self.patch_embed(patches.to(self.config.params_dtype)))  # [n, h]
        head_dim = self.config.kv_channels
        rope = vision_rope(positions, head_dim, self.rope_theta)  # [n, 1, 1, d]
        x = self.block(x[:, None, :], attention_mask, rotary_pos_emb=rope)  # [n, 1, h]
        return x[:, 0]
