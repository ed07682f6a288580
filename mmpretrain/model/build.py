"""Build the model named by a Config; the one place that turns config into modules."""
from __future__ import annotations

import math

import torch

from mmpretrain.config import Config
from mmpretrain.model.decoder import LanguageDecoder
from mmpretrain.model.nvlm import NVLMDecoderOnly
from mmpretrain.model.projector import Projector
from mmpretrain.model.specs import transformer_config
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


def set_frozen(module: torch.nn.Module, frozen: bool) -> None:
    """Freeze or unfreeze all parameters of a module."""
    for p in module.parameters():
        p.requires_grad_(not frozen)


def build_model(cfg: Config, vocab_size: int, image_token_id: int) -> NVLMDecoderOnly:
    """The NVLM model for this config, on the current device, freezing flags applied."""
    dtype, gpu = param_dtype(cfg), torch.cuda.is_available()
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    v, d = cfg.vision, cfg.decoder
    vcfg = transformer_config(
        num_layers=v.num_layers, hidden_size=v.hidden_size, num_attention_heads=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size, norm_eps=v.norm_eps, init_std=cfg.model.init_std,
        dtype=dtype, tp=tp, pp=1, rotary_interleaved=True, on_gpu=gpu)
    dcfg = transformer_config(
        num_layers=d.num_layers, hidden_size=d.hidden_size, num_attention_heads=d.num_attention_heads,
        num_query_groups=d.num_query_groups, ffn_hidden_size=d.ffn_hidden_size, norm_eps=d.norm_eps,
        init_std=cfg.model.init_std, dtype=dtype, tp=tp, pp=pp,
        sequence_parallel=cfg.parallel.sequence_parallel, on_gpu=gpu)
    vision = VisionEncoder(vcfg, v.patch_size, v.rope_theta)
    hidden = cfg.projector.hidden_size or d.hidden_size
    projector = Projector(vcfg, v.hidden_size, hidden, d.hidden_size, cfg.projector.merge)
    decoder = LanguageDecoder(dcfg, padded_vocab_size(vocab_size, tp), cfg.data.seq_length,
                              d.rope_theta)
    model = NVLMDecoderOnly(vision, projector, decoder, image_token_id)
    # megatron's torch-norm fallback makes fp32 weights; the mixed-precision optimizer expects
    # every parameter in the model dtype (megatron's own trainer casts through Float16Module).
    model.to(dtype)
    set_frozen(vision, v.freeze)
    set_frozen(projector, cfg.projector.freeze)
    set_frozen(decoder, d.freeze)
    if gpu:
        model.cuda(torch.cuda.current_device())
    return model
