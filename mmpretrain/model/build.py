"""Build the model named by a Config; the one place that turns config and layout into modules."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from megatron.core import parallel_state as ps

from mmpretrain.config import (
    FP8_MULTIPLE,
    Config,
    cross_attention_positions,
    decoder_thd,
    layer_spec_name,
)
from mmpretrain.model.cross_attention import GatedCrossAttentionLayer
from mmpretrain.model.decoder import LanguageDecoder, make_embedding, make_output_layer
from mmpretrain.model.nvlm import NVLMDecoderOnly
from mmpretrain.model.nvlm_x import NVLMCrossAttention
from mmpretrain.model.projector import Projector
from mmpretrain.model.specs import LayerSpecs, layer_specs, transformer_config
from mmpretrain.model.te_specs import fp8_settings
from mmpretrain.model.vision import VisionEncoder


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Round the vocabulary up to a multiple of `multiple` (and of tp). Independent of tp for
    the usual power-of-two sizes, so weights and checkpoints do not depend on the layout."""
    unit = math.lcm(multiple, tp)
    return (vocab_size + unit - 1) // unit * unit


def param_dtype(cfg: Config) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless the config says otherwise."""
    p = cfg.train.precision
    if p == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[p]


def set_frozen(module: torch.nn.Module | None, frozen: bool) -> None:
    """Freeze or unfreeze all parameters of a module."""
    for p in module.parameters() if module is not None else ():
        p.requires_grad_(not frozen)


def _configs(cfg: Config, spec: str, meta: bool = False):
    dtype, gpu = param_dtype(cfg), torch.cuda.is_available() and not meta
    p, v, d = cfg.parallel, cfg.vision, cfg.decoder
    # A TE run's config may build the local spec (CPU export, evaluation): it has no fused add.
    wgrad_fusion = cfg.train.gradient_accumulation_fusion and spec == "te"
    common = dict(init_std=cfg.model.init_std, dtype=dtype, tp=p.tp, on_gpu=gpu,
                  recompute=cfg.train.recompute, wgrad_fusion=wgrad_fusion)
    fp8 = fp8_settings(cfg.train.fp8, cfg.train.fp8_recipe)
    # The encoder runs whole on the first pipeline stage: to megatron it is a 1-stage model.
    vcfg = transformer_config(
        num_layers=v.num_layers, hidden_size=v.hidden_size, num_attention_heads=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size, norm_eps=v.norm_eps, pp=1, rotary_interleaved=True,
        fp8=fp8 if v.fp8 else None, **common)
    dcfg = transformer_config(
        num_layers=d.num_layers, hidden_size=d.hidden_size, num_attention_heads=d.num_attention_heads,
        num_query_groups=d.num_query_groups, ffn_hidden_size=d.ffn_hidden_size, norm_eps=d.norm_eps,
        pp=p.pp, vpp=p.vpp, first_stage_layers=p.first_stage_decoder_layers,
        sequence_parallel=p.sequence_parallel, fp8=fp8, **common)
    return vcfg, dcfg


def _vision(cfg: Config, vcfg, specs: LayerSpecs) -> VisionEncoder:
    v = cfg.vision
    return VisionEncoder(vcfg, v.patch_size, v.rope_theta, specs, pad_to=FP8_MULTIPLE if vcfg.fp8 else 1)


def _projector(cfg: Config, vcfg) -> Projector:
    hidden = cfg.projector.hidden_size or cfg.decoder.hidden_size
    return Projector(vcfg, cfg.vision.hidden_size, hidden, cfg.decoder.hidden_size, cfg.projector.merge)


def build_chunk(cfg: Config, vocab_size: int, image_token_id: int, vcfg, dcfg,
                vp_stage: int | None, specs: LayerSpecs) -> NVLMDecoderOnly:
    """The model chunk of this pipeline rank for virtual stage `vp_stage`."""
    first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    v, d = cfg.vision, cfg.decoder
    vision = projector = None
    if first:
        vision, projector = _vision(cfg, vcfg, specs), _projector(cfg, vcfg)
    design = cfg.model.design
    cross = tuple(cross_attention_positions(cfg)) if design in ("x", "h") else ()
    decoder = LanguageDecoder(dcfg, padded_vocab_size(vocab_size, cfg.parallel.tp),
                              cfg.data.seq_length, d.rope_theta, first, last, vp_stage, cross,
                              specs)
    set_frozen(vision, v.freeze)
    set_frozen(projector, cfg.projector.freeze)
    set_frozen(decoder, d.freeze)
    if cfg.model.train_only_cross_attention:
        freeze_all_but_cross_attention(vision, decoder)
    thd = decoder_thd(cfg, specs.name)
    if design == "d":
        return NVLMDecoderOnly(vision, projector, decoder, image_token_id, thd)
    return NVLMCrossAttention(vision, projector, decoder, image_token_id, design,
                              cfg.projector.merge, cfg.data.max_patches // cfg.projector.merge ** 2,
                              thd)


def freeze_all_but_cross_attention(vision, decoder: LanguageDecoder) -> None:
    """Flamingo-style: encoder and decoder frozen, cross-attention layers train (the projector
    follows projector.freeze)."""
    set_frozen(vision, True)
    set_frozen(decoder, True)
    for layer in decoder.cross_layers:
        set_frozen(layer, False)


def build_model_chunks(cfg: Config, vocab_size: int, image_token_id: int,
                       meta: bool = False) -> list[NVLMDecoderOnly]:
    """This rank's model chunks (one per virtual pipeline stage), on the current device; with
    `meta`, on the meta device (shapes and checkpoint keys, no memory), CUDA or not."""
    spec = layer_spec_name(cfg)
    vcfg, dcfg = _configs(cfg, spec, meta)  # meta: megatron's CPU init, which names no device
    specs = layer_specs(spec, cfg.model.te_fused_mlp)
    stages = [None] if cfg.parallel.vpp is None else list(range(cfg.parallel.vpp))
    chunks = []
    for vp_stage in stages:
        with torch.device("meta") if meta else contextlib.nullcontext():
            chunk = build_chunk(cfg, vocab_size, image_token_id, vcfg, dcfg, vp_stage, specs)
        # megatron's torch-norm fallback makes fp32 weights; the mixed-precision optimizer expects
        # every parameter in the model dtype (megatron's own trainer casts through Float16Module).
        chunk.to(dcfg.params_dtype)
        if torch.cuda.is_available() and not meta:
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


def part_builders(cfg: Config, vocab_size: int,
                  cpu: bool = False) -> dict[str, Callable[[], torch.nn.Module]]:
    """Constructors of the parts of the whole (unpipelined) model that can be initialised apart,
    by their prefix in its state dict: the vision encoder, the projector, the word embeddings,
    the output layer and each cross-attention layer. Each is initialised from the current RNG
    state as `build_model` would; with `cpu`, by megatron's CPU initialisation even where CUDA
    is present."""
    spec = layer_spec_name(cfg)
    vcfg, dcfg = _configs(cfg, spec, meta=cpu)
    specs = layer_specs(spec, cfg.model.te_fused_mlp)
    vocab = padded_vocab_size(vocab_size, cfg.parallel.tp)
    make = [lambda: _vision(cfg, vcfg, specs), lambda: _projector(cfg, vcfg),
            lambda: make_embedding(dcfg, vocab, cfg.data.seq_length),
            lambda: make_output_layer(dcfg, vocab)]
    prefixes = part_prefixes(cfg)
    make += [lambda: GatedCrossAttentionLayer(dcfg, specs)] * (len(prefixes) - len(make))
    return dict(zip(prefixes, make, strict=True))


def part_prefixes(cfg: Config) -> list[str]:
    """The names of `part_builders`' parts: their prefixes in the whole model's state dict."""
    cross = cross_attention_positions(cfg) if cfg.model.design in ("x", "h") else []
    return ["vision", "projector", "language_model.embedding", "language_model.output_layer",
            *(f"language_model.cross_attention_{p}" for p in cross)]


def build_model(cfg: Config, vocab_size: int, image_token_id: int,
                meta: bool = False) -> NVLMDecoderOnly:
    """The whole model as one module (no pipeline parallelism), on the current device (`meta`:
    on the meta device)."""
    if cfg.parallel.pp != 1:
        raise ValueError("build_model builds an unpipelined model; use build_model_chunks for pp > 1")
    return build_model_chunks(cfg, vocab_size, image_token_id, meta)[0]
