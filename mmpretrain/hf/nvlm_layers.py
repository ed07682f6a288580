"""Layers of the NVLM remote-code model (see `modeling_nvlm.py`): the projector with its pixel
shuffle, the gated cross-attention layer of X and H, and the Llama decoder that runs them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_nvlm import NVLMConfig


def pixel_shuffle(features: torch.Tensor, grids: list[tuple[int, int]], merge: int) -> torch.Tensor:
    """[n, h] patch features, images' (rows, cols) grids -> [n / merge^2, h * merge^2]: each merged
    token is its merge x merge patches in (dy, dx) order, tokens row-major per image."""
    if merge == 1:
        return features
    out, at = [], 0
    for rows, cols in grids:
        x = features[at:at + rows * cols].reshape(rows // merge, merge, cols // merge, merge, -1)
        out.append(x.permute(0, 2, 1, 3, 4).reshape((rows // merge) * (cols // merge), -1))
        at += rows * cols
    return torch.cat(out)


class NVLMProjector(nn.Module):
    """Pixel shuffle (merge > 1), then linear_1 -> exact GELU -> linear_2, with biases."""

    def __init__(self, config: NVLMConfig):
        super().__init__()
        self.merge = config.merge
        width = config.vision_config.hidden_size * config.merge ** 2
        self.linear_1 = nn.Linear(width, config.projector_hidden_size, bias=True)
        self.linear_2 = nn.Linear(config.projector_hidden_size, config.text_config.hidden_size, bias=True)

    def forward(self, features: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(pixel_shuffle(features, grids, self.merge))))


@dataclass
class ImageContext:
    """The cross-attended image tokens of a batch and where each may be seen."""

    states: torch.Tensor  # [k, h] projected image tokens
    rows: torch.Tensor  # [k] batch row of each token's image
    anchors: torch.Tensor  # [k] position of the token (marker or tag) introducing its image

    def visible(self, batch: int, positions: torch.Tensor) -> torch.Tensor:
        """[batch, q, k] bool: which image tokens the tokens at `positions` [q] see."""
        row = torch.arange(batch, device=self.rows.device)[:, None, None] == self.rows  # [b, 1, k]
        return row & (positions.to(self.anchors.device)[None, :, None] >= self.anchors)


class NVLMCrossAttention(nn.Module):
    """Text queries, image keys/values (grouped-query heads, no RoPE, q and k RMS-normed per head);
    fully masked rows give 0."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.heads, self.groups = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.heads
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.groups * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
        self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)  # per head, as Mllama
        self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """x [b, q, h], images [k, h], visible [b, q, k] -> [b, q, h]."""
        b, q, _ = x.shape
        d, per_group = self.head_dim, self.heads // self.groups
        query = self.q_proj(x).view(b, q, self.heads, d).transpose(1, 2)  # [b, H, q, d]
        key = self.k_proj(images).view(-1, self.groups, d).transpose(0, 1)  # [G, k, d]
        value = self.v_proj(images).view(-1, self.groups, d).transpose(0, 1)
        query, key = self.q_norm(query), self.k_norm(key)
        key, value = key.repeat_interleave(per_group, 0), value.repeat_interleave(per_group, 0)
        scores = query.float() @ key.float().transpose(-1, -2) / math.sqrt(d)  # [b, H, q, k]
        hidden = ~visible[:, None]  # [b, 1, q, k]
        probs = torch.softmax(scores.masked_fill(hidden, torch.finfo(scores.dtype).min), dim=-1)
        probs = probs * (~hidden).any(dim=-1, keepdim=True)  # a row that sees nothing: zeros
        out = probs.to(value.dtype) @ value  # [b, H, q, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, q, self.heads * d))


class NVLMCrossAttentionLayer(nn.Module):
    """h += tanh(attn_gate) * CrossAttn(norm(h)); h += tanh(mlp_gate) * sees_image * MLP(norm(h))."""

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn = NVLMCrossAttention(config)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        attn = self.cross_attn(self.input_layernorm(hidden), images, visible)
        hidden = hidden + torch.tanh(self.cross_attn_attn_gate) * attn
        sees = visible.any(dim=-1, keepdim=True).to(hidden.dtype)  # [b, q, 1]
        mlp = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + torch.tanh(self.cross_attn_mlp_gate) * sees * mlp


class NVLMTextModel(LlamaPreTrainedModel):
    """Llama decoder layers, each optionally preceded by a gated cross-attention layer (a
    transformers model of its own, so it follows the text config's attention implementation)."""

    def __init__(self, config, cross_attention_layers: list[int]):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.cross_attention_layers = nn.ModuleDict(
            {str(i): NVLMCrossAttentionLayer(config) for i in cross_attention_layers})
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None,
                cache_position=None, context: ImageContext | None = None, **kwargs) -> torch.Tensor:
        """inputs_embeds [b, q, h] -> final-normed hidden states [b, q, h]."""
        b, q, _ = inputs_embeds.shape
        if cache_position is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            cache_position = torch.arange(seen, seen + q, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position[None]
        mask = create_causal_mask(config=self.config, input_embeds=inputs_embeds,
                                  attention_mask=attention_mask, cache_position=cache_position,
                                  past_key_values=past_key_values, position_ids=position_ids)
        hidden = inputs_embeds
        rope = self.rotary_emb(hidden, position_ids)
        visible = context.visible(b, cache_position) if context is not None else None
        for i, layer in enumerate(self.layers):
            cross = self.cross_attention_layers[str(i)] if str(i) in self.cross_attention_layers else None
            if cross is not None and visible is not None and visible.shape[-1]:
                hidden = cross(hidden, context.states.to(hidden.dtype), visible)
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           past_key_values=past_key_values, cache_position=cache_position,
                           position_embeddings=rope, **kwargs)
        return self.norm(hidden)


class NVLMLanguageModel(nn.Module):
    """The decoder (`model`) and its output layer (`lm_head`), untied."""

    def __init__(self, config: NVLMConfig):
        super().__init__()
        text = config.text_config
        self.model = NVLMTextModel(text, config.cross_attention_layers)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
