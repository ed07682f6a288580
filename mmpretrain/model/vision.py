"""Pixtral-style vision encoder over one packed stream of images at native resolution."""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mmpretrain.model.packed_attention import packed_seq_params
from mmpretrain.model.rope import vision_rope, with_rope
from mmpretrain.model.specs import LayerSpecs, layer_specs


class VisionEncoder(MegatronModule):
    """Patch embedding -> RMSNorm -> transformer with 2-D RoPE; no final norm (Pixtral)."""

    def __init__(self, config: TransformerConfig, patch_size: int, rope_theta: float,
                 specs: LayerSpecs | None = None, pad_to: int = 1):
        super().__init__(config)
        self.rope_theta, self.pad_to = rope_theta, pad_to
        # A stride-p conv on patches is a linear map of the flattened (c, y, x) patch.
        self.patch_embed = torch.nn.Linear(3 * patch_size * patch_size, config.hidden_size,
                                           bias=False, dtype=config.params_dtype)
        self.ln_pre = torch.nn.RMSNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                       dtype=config.params_dtype)
        specs = specs or layer_specs("local")
        self.block = TransformerBlock(config, specs.vision_layer, post_layer_norm=False)
        torch.nn.init.normal_(self.patch_embed.weight, std=config.init_method_std)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor, image_sizes: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """patches [n, 3*p*p], positions [n, 2], image_sizes [images, 2] (patch rows, cols; read
        on the host, so best in host memory) -> features [n, h]. Each image attends within
        itself: as thd packed sequences, or through `attention_mask` [1, 1, n, n] (True =
        hidden) when one is given."""
        n = patches.shape[0]
        lengths = (image_sizes[:, 0] * image_sizes[:, 1]).cpu()  # [images]
        if attention_mask is None and (-n) % self.pad_to:  # FP8 GEMMs: tokens in multiples
            patches, positions, lengths = _pad_stream(patches, positions, lengths, self.pad_to)
        x = self.ln_pre(self.patch_embed(patches.to(self.config.params_dtype)))  # [n', h]
        rope = vision_rope(positions, self.config.kv_channels, self.rope_theta)  # [n', 1, 1, d]
        packed = None
        if attention_mask is None:  # thd: the core attention rotates the whole stream
            packed, rope = with_rope(packed_seq_params(lengths, x.device), rope), None
        x = self.block(x[:, None, :], attention_mask, rotary_pos_emb=rope,
                       packed_seq_params=packed)  # [n', 1, h]
        return x[:n, 0]


def _pad_stream(patches: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stream extended by zero patches, one more sequence, to a multiple of `multiple`."""
    pad = (-patches.shape[0]) % multiple
    return (torch.cat([patches, patches.new_zeros(pad, patches.shape[1])]),  # [n', 3*p*p]
            torch.cat([positions, positions.new_zeros(pad, 2)]),  # [n', 2]
            torch.cat([lengths, torch.tensor([pad])]))
