"""Transformer configs and layer specs for the encoder and decoder: megatron-core's local modules
(CPU and GPU) or Transformer Engine's (GPU, FP8; `te_specs`), one `LayerSpecs` per model."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from mmpretrain.model.packed_attention import PackedDotProductAttention
from mmpretrain.model.swiglu import SwiGLU
from mmpretrain.model.te_specs import te_decoder_layer_spec, te_modules, te_vision_layer_spec


def transformer_config(*, num_layers: int, hidden_size: int, num_attention_heads: int,
                       ffn_hidden_size: int, norm_eps: float, init_std: float, dtype: torch.dtype,
                       tp: int, pp: int, vpp: int | None = None,
                       first_stage_layers: int | None = None, num_query_groups: int | None = None,
                       sequence_parallel: bool = False, rotary_interleaved: bool = False,
                       on_gpu: bool = False, recompute: str = "none",
                       fp8: dict | None = None, wgrad_fusion: bool = False) -> TransformerConfig:
    """A pre-norm RMSNorm/SwiGLU transformer without biases, as Llama and Pixtral use.
    `recompute`: 'selective' recomputes the attention core in backward, 'full' each layer (only
    its input is kept), 'none' keeps all activations. `fp8`: `te_specs.fp8_settings` (TE only).
    `wgrad_fusion`: TE's linears accumulate weight gradients into the fp32 buffer in the GEMM
    (megatron's own linears take `without_wgrad_fusion` of the config)."""
    return TransformerConfig(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups, ffn_hidden_size=ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=init_std,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, num_layers_in_first_pipeline_stage=first_stage_layers,
        sequence_parallel=sequence_parallel, rotary_interleaved=rotary_interleaved,
        # Fused kernels come from apex/TE on GPU; these are the portable paths.
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=wgrad_fusion,
        # Each MLP spec names its activation module (`swiglu.SwiGLU`, FC1's output kept only).
        use_te_activation_func=True,
        attention_softmax_in_fp32=True,
        # CPU init makes a TP-sharded init identical to the unsharded one.
        use_cpu_initialization=not on_gpu,
        # gloo: batched isend/irecv can pair an activation with a gradient when the previous and
        # next stage are the same rank (pp=2, virtual stages); the unbatched path keeps them apart.
        batch_p2p_comm=on_gpu,
        calculate_per_token_loss=True,
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        **(fp8 or {}),
    )


def without_wgrad_fusion(config: TransformerConfig) -> TransformerConfig:
    """The config for megatron's own Column/RowParallelLinear: they fuse the weight-gradient
    accumulation only through apex's extension, which this project does not install."""
    if not config.gradient_accumulation_fusion:
        return config
    return replace(config, gradient_accumulation_fusion=False)


def decoder_layer_spec() -> ModuleSpec:
    """Decoder layer: causal self-attention within each packed sample (thd packed sequences, or
    a dense block-diagonal causal mask)."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    spec.submodules.mlp.submodules.activation_func = SwiGLU
    return spec


def vision_layer_spec() -> ModuleSpec:
    """Encoder layer: bidirectional self-attention within each image of the packed stream
    (thd packed sequences, or a dense block-diagonal mask)."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    spec.submodules.mlp.submodules.activation_func = SwiGLU
    return spec


@dataclass(frozen=True)
class LayerSpecs:
    """The modules one model is built from: `local` or `te`."""
    name: str
    decoder_layer: ModuleSpec
    """Decoder TransformerLayer (causal self-attention, SwiGLU MLP)."""
    vision_layer: ModuleSpec
    """Encoder TransformerLayer (bidirectional self-attention)."""
    norm: type | ModuleSpec
    """RMSNorm of layers built by hand (the cross-attention layers), for `build_module`."""
    column_linear: type
    """Column-parallel linear of layers built by hand."""
    row_linear: type
    """Row-parallel linear of layers built by hand."""


def layer_specs(name: str = "local", te_fused_mlp: bool = False) -> LayerSpecs:
    """'local': megatron-core modules, any device; 'te': Transformer Engine's (CUDA), with
    `te_fused_mlp` their MLPs through TE's operation fuser (`te_specs.te_decoder_layer_spec`)."""
    if name == "te":
        norm, column, row = te_modules()
        return LayerSpecs("te", te_decoder_layer_spec(te_fused_mlp),
                          te_vision_layer_spec(te_fused_mlp), norm, column, row)
    if name != "local":
        raise ValueError(f"unknown layer spec {name!r} (local or te)")
    decoder = decoder_layer_spec()
    return LayerSpecs("local", decoder, vision_layer_spec(), decoder.submodules.input_layernorm,
                      tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear)
