"""SwiGLU that keeps only its input for the backward pass.

    y = [gate, up] (FC1's output, [..., 2f/tp])  ->  silu(gate) * up   [..., f/tp]

megatron-core's unfused GLU lets autograd keep FC1's output, the SiLU's output and a copy of the
linear half (4f per token); its fused one (`bias_activation_fusion`) keeps FC1's output only but
is compiled with torch.compile. This is the fused one's memory in eager PyTorch: the backward
recomputes the SiLU from the kept input, with the same operations autograd would run, so outputs
and gradients are bit-identical to the unfused GLU's. megatron's MLP builds it as its activation
module (`MLPSubmodules.activation_func`, used when `use_te_activation_func` is set).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y)
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        gate, up = y.chunk(2, dim=-1)
        dy = torch.empty_like(y)  # written in place: no concatenated copy at the end
        d_gate, d_up = dy.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=d_up)
        torch.mul(grad, up, out=d_gate)
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        return dy


class SwiGLU(MegatronModule):
    """The MLP's activation module: [..., 2f] -> [..., f], keeping only its input."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return _SwiGLU.apply(y)
