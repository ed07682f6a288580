"""Transformer Engine layer specs (GPU): RMSNorm fused into the following linear, TE's column and
row parallel linears, and `TEDotProductAttention` (flash / cuDNN kernels; thd packed sequences).
These are the layers FP8 training runs on. Transformer Engine is imported only here, and only
when a TE spec is asked for: it does not install without CUDA."""
from __future__ import annotations

import copy

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from mmpretrain.model.rope import RopeInCoreAttention
from mmpretrain.model.swiglu import SwiGLU


def te_unavailable() -> str | None:
    """Why Transformer Engine layers cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as _  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the installation
        return f"Transformer Engine does not import ({err})"
    return None


def fp8_unavailable(recipe: str) -> str | None:
    """Why FP8 training with `recipe` cannot run on this GPU, or None when it can. FP8 needs
    compute capability 8.9 (Ada, Hopper) or newer; MXFP8 needs 10.0 (Blackwell)."""
    reason = te_unavailable()
    if reason:
        return reason
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if (major, minor) < (8, 9):
        return f"{name} (compute capability {major}.{minor}) has no FP8 tensor cores (8.9+)"
    if recipe == "mxfp8" and major < 10:
        return f"MXFP8 needs compute capability 10.0+ (B200); {name} is {major}.{minor}"
    return None


def fp8_settings(fp8: str | None, recipe: str) -> dict:
    """TransformerConfig fields of an FP8 run (none for bf16). Delayed scaling keeps a 1024-step
    amax history and scales by its max, the setting NVIDIA's recipes use for LLM pretraining."""
    if fp8 is None:
        return {}
    out = {"fp8": fp8, "fp8_recipe": recipe}
    if recipe == "delayed":
        out.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return out


def te_decoder_layer_spec(fused_mlp: bool = False) -> ModuleSpec:
    """megatron-core's TE GPT layer: causal self-attention (thd: padding_causal per sample), its
    core attention rotating thd queries and keys itself (`rope.RopeInCoreAttention`), the MLP's
    activation `swiglu.SwiGLU`; with `fused_mlp`, megatron's TEFusedMLP (norm, FC1, TE's SwiGLU,
    FC2 through TE's operation fuser, the same parameters)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    class TERopedDotProductAttention(RopeInCoreAttention, TEDotProductAttention):
        """TE's attention (flash / cuDNN) after the stream-wide RoPE of thd sequences."""

    spec = get_gpt_layer_with_transformer_engine_spec(use_te_op_fuser=fused_mlp)
    spec.submodules.self_attention.submodules.core_attention = TERopedDotProductAttention
    if not fused_mlp:  # TEFusedMLP takes its activation from config.activation_func (F.silu)
        spec.submodules.mlp.submodules.activation_func = SwiGLU
    return spec


def te_vision_layer_spec(fused_mlp: bool = False) -> ModuleSpec:
    """The same layer with bidirectional attention (thd: each image attends within itself)."""
    spec = copy.deepcopy(te_decoder_layer_spec(fused_mlp))
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    return spec


def te_modules() -> tuple[type, type, type]:
    """(norm, column-parallel linear, row-parallel linear) for layers built by hand."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )
    return TENorm, TEColumnParallelLinear, TERowParallelLinear
