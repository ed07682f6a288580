"""Vision-to-language projector: optional 2x2 patch merge, then a 2-layer GELU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mmpretrain.data.packing import on_device, patch_layout
from mmpretrain.model.specs import without_wgrad_fusion


def merge_patches(features: torch.Tensor, sizes: torch.Tensor, merge: int) -> torch.Tensor:
    """Pixel shuffle per image: [n, h] -> [n / merge^2, h * merge^2], grids row-major; `sizes`
    [n_images, 2] (patch rows, cols) read on the host, so best in host memory."""
    if merge == 1:
        return features
    order = on_device(merge_order(sizes.cpu(), merge), features.device)  # [n]
    return features.index_select(0, order).reshape(-1, merge * merge * features.shape[1])


def merge_order(sizes: torch.Tensor, merge: int) -> torch.Tensor:
    """[n] the stream's patches in merged order: each merged token's merge x merge patches
    (row-major within the square) one after another, tokens row-major, image after image."""
    first, local, cols = patch_layout(sizes)  # local: position in merged order within the image
    token, within = local // (merge * merge), local % (merge * merge)
    per_row = cols // merge  # merged tokens per row
    row = token // per_row * merge + within // merge
    col = token % per_row * merge + within % merge
    return first + row * cols + col


class Projector(MegatronModule):
    """linear_1 (column-parallel) -> GELU -> linear_2 (row-parallel), with biases (LLaVA)."""

    def __init__(self, config: TransformerConfig, in_size: int, hidden: int, out_size: int,
                 merge: int = 1):
        super().__init__(config)
        self.merge = merge
        linear = without_wgrad_fusion(config)
        self.linear_1 = tensor_parallel.ColumnParallelLinear(
            in_size * merge * merge, hidden, config=linear, init_method=config.init_method,
            bias=True, gather_output=False)
        self.linear_2 = tensor_parallel.RowParallelLinear(
            hidden, out_size, config=linear, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, features: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """features [n, h_vision], grid sizes [n_images, 2] -> [n / merge^2, h_decoder]."""
        x = merge_patches(features, sizes, self.merge)[:, None, :]  # [t, 1, h*m*m]
        x, _ = self.linear_1(x)
        x, _ = self.linear_2(F.gelu(x))
        return x[:, 0]
