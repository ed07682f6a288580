"""The remote-code export format ('nvlm'): X, H, tiled D and pixel-shuffled D.

transformers has no class for these, so the export carries its own: `configuration_nvlm.py`,
`nvlm_layers.py` and `modeling_nvlm.py` (in this package, torch + transformers only) are copied
into the export, and `config.json`'s `auto_map` names them, so that
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` (or
`AutoModelForImageTextToText`) builds `NVLMForConditionalGeneration`. `processing_nvlm.py` and the
training's own pixel, resize and tiling modules (as `nvlm_pixels.py`, `nvlm_resize.py`,
`nvlm_tiling.py`) make `AutoProcessor` give the same inputs training builds (`processor.py`).

Tensor names are LLaVA's on-disk names (`mapping.py`: vision tower, projector, decoder) plus one
group per gated cross-attention layer. Our layer before decoder layer L (1-based,
`language_model.cross_attention_L.*`) is HF's `language_model.model.cross_attention_layers.{L-1}`,
with Mllama's names for the parts of a cross-attention decoder layer:

    ours                                    HF (Mllama's spelling)
    input_layernorm.weight                  input_layernorm.weight
    linear_q / linear_k / linear_v.weight   cross_attn.q_proj / k_proj / v_proj.weight
    linear_proj.weight                      cross_attn.o_proj.weight
    q_norm / k_norm.weight                  cross_attn.q_norm / k_norm.weight   [d], per head
    cross_attn_attn_gate                    cross_attn_attn_gate            [1], tanh-gated
    pre_mlp_layernorm.weight                post_attention_layernorm.weight
    mlp.linear_fc1.weight (gate; up)        mlp.gate_proj.weight, mlp.up_proj.weight
    mlp.linear_fc2.weight                   mlp.down_proj.weight
    cross_attn_mlp_gate                     cross_attn_mlp_gate             [1], tanh-gated
Cross-attention has no RoPE, so no row permutation; k and v are plain [groups*d, h] projections.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from mmpretrain.config import Config, cross_attention_positions
from mmpretrain.data import pixels as pixels_module
from mmpretrain.data import resize as resize_module
from mmpretrain.data import tiling as tiling_module
from mmpretrain.hf import ConversionError
from mmpretrain.hf.configs import _require, llama_config, pixtral_config, rope_table_side
from mmpretrain.hf.mapping import (
    Dims,
    Group,
    _mlp,
    _rename,
    decoder_groups,
    projector_groups,
    vision_groups,
)

HERE = Path(__file__).parent
CODE_FILES = {name: HERE / name for name in ("configuration_nvlm.py", "nvlm_layers.py",
                                             "modeling_nvlm.py", "processing_nvlm.py")} | {
    "nvlm_pixels.py": Path(pixels_module.__file__), "nvlm_resize.py": Path(resize_module.__file__),
    "nvlm_tiling.py": Path(tiling_module.__file__)}
MODEL_CLASS = "modeling_nvlm.NVLMForConditionalGeneration"
AUTO_MAP = {"AutoConfig": "configuration_nvlm.NVLMConfig", "AutoModelForCausalLM": MODEL_CLASS,
            "AutoModelForImageTextToText": MODEL_CLASS}
CROSS = "cross_attention"  # the part of the cross-attention layers (see import_.py)
CROSS_PREFIX = "language_model.model.cross_attention_layers."


def cross_positions(cfg: Config) -> list[int]:
    """1-based decoder layers a gated cross-attention layer precedes (none for D)."""
    return cross_attention_positions(cfg) if cfg.model.design in ("x", "h") else []


def cross_groups(cfg: Config) -> list[Group]:
    """Our `language_model.cross_attention_L.*` <-> `language_model.model.cross_attention_layers.{L-1}.*`."""
    out = []
    for layer in cross_positions(cfg):
        ours, hf = f"language_model.cross_attention_{layer}", f"{CROSS_PREFIX}{layer - 1}"
        out += [_rename(CROSS, f"{ours}.input_layernorm.weight", f"{hf}.input_layernorm.weight")]
        out += [_rename(CROSS, f"{ours}.linear_{a}.weight", f"{hf}.cross_attn.{b}_proj.weight")
                for a, b in (("q", "q"), ("k", "k"), ("v", "v"), ("proj", "o"))]
        out += [_rename(CROSS, f"{ours}.{a}_norm.weight", f"{hf}.cross_attn.{a}_norm.weight")
                for a in ("q", "k")]
        out += [_rename(CROSS, f"{ours}.cross_attn_attn_gate", f"{hf}.cross_attn_attn_gate"),
                _rename(CROSS, f"{ours}.pre_mlp_layernorm.weight", f"{hf}.post_attention_layernorm.weight"),
                _mlp(CROSS, f"{ours}.mlp", f"{hf}.mlp"),
                _rename(CROSS, f"{ours}.mlp.linear_fc2.weight", f"{hf}.mlp.down_proj.weight"),
                _rename(CROSS, f"{ours}.cross_attn_mlp_gate", f"{hf}.cross_attn_mlp_gate")]
    return out


def nvlm_groups(cfg: Config) -> list[Group]:
    """The whole model of any design <-> NVLMForConditionalGeneration."""
    d = Dims.of(cfg)
    return vision_groups(d) + projector_groups() + decoder_groups(d) + cross_groups(cfg)


def image_side(cfg: Config) -> int:
    """Pixels a side of the vision tower's 2-D RoPE table: a tile, or the native images' reach."""
    return cfg.data.tile_size if cfg.data.resize == "tiles" else rope_table_side(cfg)


def nvlm_config(cfg: Config, vocab_size: int, tok, dtype_name: str):
    """The NVLMConfig of our model; `vocab_size` is the padded size of our embedding."""
    from mmpretrain.hf.configuration_nvlm import NVLMConfig

    d = cfg.data
    out = NVLMConfig(
        vision_config=pixtral_config(cfg, image_side(cfg)), text_config=llama_config(cfg, vocab_size, tok),
        design=cfg.model.design, merge=cfg.projector.merge,
        projector_hidden_size=cfg.projector.hidden_size or cfg.decoder.hidden_size,
        cross_attention_layers=[k - 1 for k in cross_positions(cfg)],
        image_token_index=tok.img_id, image_marker_index=tok.image_marker_id,
        tile_token_ids=[tok.tile_id(k) for k in range(1, d.max_tiles + 1)],
        thumbnail_token_index=tok.thumbnail_id, resize=d.resize, tile_size=d.tile_size,
        max_tiles=d.max_tiles, tile_thumbnail=d.tile_thumbnail,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    out.architectures = ["NVLMForConditionalGeneration"]
    out.auto_map = dict(AUTO_MAP)
    out.dtype = dtype_name
    return out


def write_code(out: Path) -> None:
    """Copy the configuration, modeling and processing files into the export."""
    for name, source in CODE_FILES.items():
        shutil.copyfile(source, Path(out) / name)


def check_code(hf_dir: Path) -> None:
    """The export's code files are this version's (so loading them runs code we wrote)."""
    for name, source in CODE_FILES.items():
        theirs = Path(hf_dir) / name
        if not theirs.is_file() or theirs.read_bytes() != source.read_bytes():
            raise ConversionError(f"{theirs}: missing or not the one this mmpretrain writes; "
                                  f"export again with `mmpretrain convert to-hf`")


def check_nvlm_config(conf: dict, cfg: Config) -> None:
    """An NVLM export computes what the job config's model computes (beyond tensor shapes)."""
    _require("model.design", cfg.model.design, "design", conf.get("design"))
    _require("projector.merge", cfg.projector.merge, "merge", conf.get("merge"))
    _require("cross-attention layers (0-based)", [k - 1 for k in cross_positions(cfg)],
             "cross_attention_layers", list(conf.get("cross_attention_layers", [])))
