"""Pixtral-style vision encoder over one packed stream of images at native resolution."""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mmpretrain.model.packed_attention import packed_seq_params
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

    def forward(self, patches: torch.Tensor, positions: torch.Tensor, image_sizes: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """patches [n, 3*p*p], positions [n, 2], image_sizes [images, 2] (patch rows, cols) ->
        features [n, h]. Each image attends within itself: as thd packed sequences, or through
        `attention_mask` [1, 1, n, n] (True = hidden) when one is given."""
        x = self.ln_pre(self.patch_embed(patches.to(self.config.params_dtype)))  # [n, h]
        head_dim = self.config.kv_channels
        rope = vision_rope(positions, head_dim, self.rope_theta)  # [n, 1, 1, d]
        packed = None if attention_mask is not None else \
            packed_seq_params(image_sizes[:, 0] * image_sizes[:, 1])
        x = self.block(x[:, None, :], attention_mask, rotary_pos_emb=rope,
                       packed_seq_params=packed)  # [n, 1, h]
        return x[:, 0]
