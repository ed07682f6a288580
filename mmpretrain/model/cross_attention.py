"""Gated cross-attention layer of the X and H designs: text queries, image keys and values.

    h = h + tanh(attn_gate) * CrossAttention(RMSNorm(h), images)   (q, k RMS-normed per head)
    h = h + tanh(mlp_gate) * has_image * SwiGLU(RMSNorm(h))
Both gates start at 0, so an untrained layer is the identity. A token whose mask row is all True
(no image of its sample before it) gets exactly zero from both sub-layers.

Tensor parallel like megatron's attention: queries, keys and values column-parallel by head, the
output projection row-parallel. With sequence parallel the text stream arrives split along s:
`linear_q` gathers it, `linear_proj` reduce-scatters; the image stream is never split.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mmpretrain.model.packed_attention import from_thd, to_thd
from mmpretrain.model.specs import LayerSpecs
from mmpretrain.model.swiglu import SwiGLU


def _norm(config: TransformerConfig, specs: LayerSpecs):
    """The decoder's own RMSNorm module, for the same sequence-parallel handling."""
    return build_module(specs.norm, config=config, hidden_size=config.hidden_size,
                        eps=config.layernorm_epsilon)


class HeadRMSNorm(torch.nn.Module):
    """RMSNorm over the head dimension of [..., heads, d] with one weight [d] shared by all heads
    (Mllama's q_norm/k_norm). Under tensor parallelism each rank normalises its own heads, so the
    weight enters through megatron's copy-to-TP region: its gradient is summed over TP ranks."""

    def __init__(self, d: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(d, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = tensor_parallel.copy_to_tensor_model_parallel_region(self.weight)
        xf = x.float()  # one fp32 copy, kept for the backward of both uses
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * weight


def _gate(config: TransformerConfig) -> torch.nn.Parameter:
    """A scalar gate at 0; under sequence parallel its grad is summed over TP like a norm's."""
    gate = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
    gate.sequence_parallel = config.sequence_parallel
    return gate


def attend_or_zero(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention with `mask` True = excluded; a query whose row is all masked gets
    exactly zero (not a uniform mix, not NaN) and passes no gradient. q [b, n, s, d],
    k/v [b, g, kr, d], mask [b, 1, s, kr] -> [b, n, s, d]."""
    sees = (~mask).any(dim=-1, keepdim=True)  # [b, 1, s, 1]
    allowed = ~mask | ~sees  # a row that sees nothing attends to all keys, then is zeroed
    # Key/value heads repeated here rather than `enable_gqa`, which torch's memory-efficient
    # kernel (the CUDA kernel that takes a mask) does not take in every version: the math kernel
    # would keep the [b, n, s, kr] probabilities.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # [b, n, kr, d]
    out = F.scaled_dot_product_attention(q, k, v, allowed)
    return out * sees


class GatedCrossAttentionLayer(MegatronModule):
    """One gated cross-attention layer; the images and mask come with each call."""

    def __init__(self, config: TransformerConfig, specs: LayerSpecs):
        super().__init__(config)
        h, d = config.hidden_size, config.kv_channels
        self.n_heads, self.n_groups = config.num_attention_heads, config.num_query_groups
        column, row = specs.column_linear, specs.row_linear
        linear = dict(config=config, init_method=config.init_method, bias=False,
                      gather_output=False, skip_bias_add=False, is_expert=False)
        # The image stream is not sequence-split: its projections must not gather along s.
        image_cfg = dataclasses.replace(config, sequence_parallel=False)
        image_linear = {**linear, "config": image_cfg}
        self.input_layernorm = _norm(config, specs)
        self.linear_q = column(h, self.n_heads * d, **linear)
        self.linear_k = column(h, self.n_groups * d, **image_linear)
        self.linear_v = column(h, self.n_groups * d, **image_linear)
        self.linear_proj = row(self.n_heads * d, h, config=config,
                               init_method=config.output_layer_init_method, bias=False,
                               input_is_parallel=True, skip_bias_add=True, is_expert=False)
        self.pre_mlp_layernorm = _norm(config, specs)
        self.mlp = MLP(config, MLPSubmodules(linear_fc1=column, linear_fc2=row, activation_func=SwiGLU))
        # Queries and keys normalised per head (as Mllama does): the attention logits start at a
        # useful scale whatever the image embeddings' scale, so the layer learns to look early.
        self.q_norm = HeadRMSNorm(config.kv_channels, config.layernorm_epsilon, config.params_dtype)
        self.k_norm = HeadRMSNorm(config.kv_channels, config.layernorm_epsilon, config.params_dtype)
        self.cross_attn_attn_gate = _gate(config)
        self.cross_attn_mlp_gate = _gate(config)
    def attend(self, x: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cross-attention output before its gate: x [s(/tp), b, h] or, thd, [b*s(/tp), 1, h],
        images [kr, b, h] (each row's own keys), mask [b, 1, s, kr] -> the shape of x."""
        if images.shape[0] == 0:  # no image in the micro-batch: nothing to attend to
            return torch.zeros_like(x)
        d, (b, _, s, kr) = self.config.kv_channels, mask.shape
        q, _ = self.linear_q(x)  # [s, b, nh/tp * d] (gathered along s under SP)
        k, _ = self.linear_k(images)  # [kr, b, ng/tp * d]
        v, _ = self.linear_v(images)  # [kr, b, ng/tp * d]
        thd = q.shape[1] != b  # (with b == 1 the two layouts are the same)
        q = from_thd(q, b) if thd else q  # [s, b, nh/tp * d]
        q = q.reshape(s, b, -1, d).permute(1, 2, 0, 3)  # [b, nh/tp, s, d]
        k = k.view(kr, b, -1, d).permute(1, 2, 0, 3)  # [b, ng/tp, kr, d]
        v = v.view(kr, b, -1, d).permute(1, 2, 0, 3)
        q, k = self.q_norm(q), self.k_norm(k)
        # In the activation dtype: the fused kernels (flash on CPU, memory-efficient on CUDA)
        # accumulate and take the softmax in fp32 for bf16 inputs, as the decoder's attention does.
        ctx = attend_or_zero(q, k, v, mask)  # [b, nh, s, d]
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, nh/tp * d]
        out, _ = self.linear_proj(to_thd(ctx) if thd else ctx)  # the shape of x
        return out

    def has_image(self, mask: torch.Tensor, thd: bool) -> torch.Tensor:
        """[s(/tp), b, 1] (thd: [b*s(/tp), 1, 1]) 1.0 where a token sees at least one image (this
        rank's share of the stream)."""
        rows = (~mask[:, 0]).any(dim=-1).t()[..., None].to(self.config.params_dtype)  # [s, b, 1]
        rows = to_thd(rows) if thd else rows
        if self.config.sequence_parallel:
            rows = tensor_parallel.scatter_to_sequence_parallel_region(rows)
        return rows

    def forward(self, hidden: torch.Tensor, images: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        """hidden [s(/tp), b, h] (thd: [b*s(/tp), 1, h]), images [kr, b, h], mask [b, 1, s, kr]
        (see `PackedBatch.cross_attention_rows`) -> the shape of hidden; the identity without
        images."""
        if images is None:
            return hidden
        attn = self.attend(self.input_layernorm(hidden), images, mask)
        hidden = hidden + torch.tanh(self.cross_attn_attn_gate) * attn
        mlp, _ = self.mlp(self.pre_mlp_layernorm(hidden))  # [s(/tp), b, h]
        thd = hidden.shape[1] != mask.shape[0]
        return hidden + torch.tanh(self.cross_attn_mlp_gate) * self.has_image(mask, thd) * mlp
