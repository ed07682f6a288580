"""Configuration of NVLM-D/X/H models exported by mmpretrain (remote code for transformers).

This file and `modeling_nvlm.py` are written into every export of an X, H, tiled-D or merged-D
model; `config.json`'s `auto_map` points transformers at them, so

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

loads the model. It needs only torch and transformers.
"""
from __future__ import annotations

from transformers import PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING, AutoConfig

DESIGNS = ("d", "x", "h")


def _sub_config(value, default_type: str):
    """A sub-config from a dict (as read from config.json), a config object or None (defaults)."""
    if isinstance(value, dict):
        value = dict(value)
        return CONFIG_MAPPING[value.pop("model_type", default_type)](**value)
    return CONFIG_MAPPING[default_type]() if value is None else value


class NVLMConfig(PretrainedConfig):
    """A Pixtral vision tower, a (pixel-shuffle +) 2-layer GELU projector and a Llama decoder.

    design: 'd' image embeddings replace the `[IMG]` tokens of the text; 'x' every image reaches
        the decoder through gated cross-attention, anchored at its `<image>` marker; 'h' images
        whose tag is `<tile_global_thumbnail>` replace `[IMG]` tokens as in 'd', the other tiles
        are cross-attended, each anchored at its `<tile_k>` tag.
    merge: pixel shuffle per side before the projector (1: none, 2: 2x2 patches -> one token).
    cross_attention_layers: 0-based indices i of decoder layers; a gated cross-attention layer
        (Mllama's names: `cross_attn_attn_gate`, `cross_attn_mlp_gate`) runs before `layers[i]`.
    resize, tile_size, max_tiles, tile_thumbnail: how training prepared images ('native' or
        NVLM 'tiles' of tile_size pixels plus a global thumbnail); informative for processors.
    """

    model_type = "nvlm"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(self, vision_config=None, text_config=None, design: str = "d", merge: int = 1,
                 projector_hidden_size: int | None = None, cross_attention_layers=(),
                 image_token_index: int = 4, image_marker_index: int = 7, tile_token_ids=(),
                 thumbnail_token_index: int | None = None, resize: str = "native",
                 tile_size: int = 448, max_tiles: int = 6, tile_thumbnail: bool = True,
                 tie_word_embeddings: bool = False, **kwargs):
        if design not in DESIGNS:
            raise ValueError(f"design={design!r}: expected one of {DESIGNS}")
        if merge not in (1, 2):
            raise ValueError(f"merge={merge}: expected 1 or 2")
        self.vision_config = _sub_config(vision_config, "pixtral")
        self.text_config = _sub_config(text_config, "llama")
        self.design, self.merge = design, merge
        self.projector_hidden_size = projector_hidden_size or self.text_config.hidden_size
        self.cross_attention_layers = sorted(int(i) for i in cross_attention_layers)
        self.image_token_index, self.image_marker_index = image_token_index, image_marker_index
        self.tile_token_ids = [int(i) for i in tile_token_ids]
        self.thumbnail_token_index = thumbnail_token_index
        self.resize, self.tile_size, self.max_tiles = resize, tile_size, max_tiles
        self.tile_thumbnail = tile_thumbnail
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


__all__ = ["NVLMConfig"]
