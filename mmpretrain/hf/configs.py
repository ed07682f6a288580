"""Our job config <-> transformers configs (LlavaConfig = PixtralVisionConfig + LlamaConfig).

Export writes the decoder as Llama; import reads Llama or Mistral (the same layers; Mistral's
sliding window must cover the sequence). Sizes that shape tensors are checked tensor by tensor
(`import_.py`); the fields below change the computation without changing any shape, so they are
checked here, each error naming our key and the HF field.
"""
from __future__ import annotations

import math

from mmpretrain.config import Config
from mmpretrain.hf import ConversionError

# HF PixtralRMSNorm is built with eps=1e-5 whatever the config says.
PIXTRAL_NORM_EPS = 1e-5


def check_exportable(cfg: Config) -> str:
    """The export format of this model, or a ConversionError saying why there is none: 'llava'
    (LlavaForConditionalGeneration) for D at native resolution without pixel shuffle and with a
    decoder-wide projector, 'nvlm' (the remote-code model of `modeling_nvlm.py`) otherwise."""
    if not math.isclose(cfg.vision.norm_eps, PIXTRAL_NORM_EPS):
        raise ConversionError(f"vision.norm_eps={cfg.vision.norm_eps}: HF Pixtral's norms use "
                              f"eps={PIXTRAL_NORM_EPS}")
    llava = (cfg.model.design == "d" and getattr(cfg.data, "resize", "native") == "native"
             and cfg.projector.merge == 1
             and cfg.projector.hidden_size in (None, cfg.decoder.hidden_size))
    return "llava" if llava else "nvlm"


def _side_cap(cfg: Config) -> int:
    """data.max_image_side (0: none)."""
    return getattr(cfg.data, "max_image_side", 0)


def max_image_side(cfg: Config) -> int:
    """Pixels per side the HF processor resizes to at most: the largest square within the
    token budget, and within data.max_image_side (the HF processor caps the longest edge where
    ours caps the patch count)."""
    p = cfg.vision.patch_size * cfg.projector.merge  # HF rounds sizes up to multiples of this
    side = p * max(1, math.isqrt(cfg.data.image_token_budget) // cfg.projector.merge)
    return max(p, min(side, _side_cap(cfg) // p * p)) if _side_cap(cfg) else side


def longest_grid_side(cfg: Config) -> int:
    """Most patches along one side of a grid `data/resize.native_size` makes: a thin strip keeps
    one merge unit across and takes the whole budget along its length, unless
    data.max_image_side stops it first."""
    p, m = cfg.vision.patch_size, cfg.projector.merge
    side = max(1, cfg.data.image_token_budget // (m * m)) * m
    return min(side, max(m, _side_cap(cfg) // (p * m) * m)) if _side_cap(cfg) else side


def rope_table_side(cfg: Config) -> int:
    """PixtralVisionConfig.image_size: the side (pixels) HF's 2-D RoPE table covers, that of the
    longest grid training makes (a position past the table would index out of it or alias onto
    the next row). The table holds side^2 positions: data.max_image_side bounds it."""
    return cfg.vision.patch_size * longest_grid_side(cfg)


def pixtral_config(cfg: Config, image_size: int | None = None):
    """The PixtralVisionConfig of our encoder; `image_size` (pixels) is the side its 2-D RoPE
    table covers (default: `rope_table_side`)."""
    from transformers import PixtralVisionConfig

    v = cfg.vision
    return PixtralVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_attention_heads, num_channels=3,
        image_size=image_size or rope_table_side(cfg), patch_size=v.patch_size, hidden_act="silu",
        rope_theta=v.rope_theta, initializer_range=cfg.model.init_std)


def llama_config(cfg: Config, vocab_size: int, tok):
    """The LlamaConfig of our decoder; `vocab_size` is the padded size of our embedding."""
    from transformers import LlamaConfig

    d = cfg.decoder
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=d.hidden_size, intermediate_size=d.ffn_hidden_size,
        num_hidden_layers=d.num_layers, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_query_groups, head_dim=d.hidden_size // d.num_attention_heads,
        hidden_act="silu", max_position_embeddings=cfg.data.seq_length, rms_norm_eps=d.norm_eps,
        rope_theta=d.rope_theta, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        initializer_range=cfg.model.init_std, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id)


def llava_config(cfg: Config, vocab_size: int, tok, dtype_name: str):
    """The LlavaConfig of our D model; `vocab_size` is the padded size of our embedding."""
    from transformers import LlavaConfig

    out = LlavaConfig(
        vision_config=pixtral_config(cfg), text_config=llama_config(cfg, vocab_size, tok),
        image_token_index=tok.img_id, projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        multimodal_projector_bias=True, image_seq_length=cfg.data.image_token_budget,
        tie_word_embeddings=False)
    out.architectures = ["LlavaForConditionalGeneration"]
    out.dtype = dtype_name
    return out


# ---------------------------------------------------------------- import checks


def _differs(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return not math.isclose(float(a), float(b), rel_tol=1e-9)
    return a != b


def _require(ours_key: str, ours, hf_field: str, hf) -> None:
    if _differs(ours, hf):
        raise ConversionError(f"{ours_key} is {ours!r} in the job config but the HF model has "
                              f"{hf_field}={hf!r}")


def check_text_config(text: dict, cfg: Config) -> None:
    """A Llama/Mistral text config computes what our decoder computes."""
    d = cfg.decoder
    kind = text.get("model_type")
    if kind not in ("llama", "mistral"):
        raise ConversionError(f"text model_type={kind!r}: only llama and mistral decoders import")
    heads = text.get("num_attention_heads")
    _require("decoder.num_attention_heads", d.num_attention_heads, "num_attention_heads", heads)
    _require("decoder.num_query_groups", d.num_query_groups, "num_key_value_heads",
             text.get("num_key_value_heads") or heads)
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    _require("decoder head dim (hidden_size / num_attention_heads)", d.hidden_size // d.num_attention_heads,
             "head_dim", head_dim)
    _require("decoder.norm_eps", d.norm_eps, "rms_norm_eps", text.get("rms_norm_eps", 1e-6))
    _require("decoder.rope_theta", d.rope_theta, "rope_theta", text.get("rope_theta", 10000.0))
    _require("the decoder activation", "silu", "hidden_act", text.get("hidden_act", "silu"))
    for field in ("attention_bias", "mlp_bias"):
        _require(f"the decoder's {field}", False, field, bool(text.get(field, False)))
    if text.get("rope_scaling"):
        raise ConversionError(f"rope_scaling={text['rope_scaling']!r}: the decoder has plain RoPE")
    window = text.get("sliding_window")
    if window is not None and window < cfg.data.seq_length:
        raise ConversionError(f"sliding_window={window} is shorter than data.seq_length="
                              f"{cfg.data.seq_length}; the decoder attends to the whole sequence")


def check_vision_config(vision: dict, cfg: Config) -> None:
    """A Pixtral vision config computes what our encoder computes."""
    v = cfg.vision
    if vision.get("model_type") != "pixtral":
        raise ConversionError(f"vision model_type={vision.get('model_type')!r}: only a Pixtral "
                              f"vision tower imports")
    _require("vision.num_attention_heads", v.num_attention_heads, "num_attention_heads",
             vision.get("num_attention_heads"))
    _require("vision.patch_size", v.patch_size, "patch_size", vision.get("patch_size"))
    _require("vision.rope_theta", v.rope_theta, "rope_theta", vision.get("rope_theta", 10000.0))
    _require("the vision activation", "silu", "hidden_act", vision.get("hidden_act", "gelu"))
    _require("vision.norm_eps", v.norm_eps, "PixtralRMSNorm eps", PIXTRAL_NORM_EPS)


def vision_layers_used(llava: dict) -> int:
    """How many tower layers feed the projector (`vision_feature_layer`: -1 = all of them)."""
    layer, n = llava.get("vision_feature_layer", -2), llava["vision_config"]["num_hidden_layers"]
    if not isinstance(layer, int):
        raise ConversionError(f"vision_feature_layer={layer!r}: one feature layer only")
    return layer if layer >= 0 else n + 1 + layer


def check_llava_config(llava: dict, cfg: Config) -> None:
    """The LLaVA glue: feature layer and strategy, projector activation and width."""
    if llava.get("vision_feature_select_strategy", "default") != "full":
        raise ConversionError(f"vision_feature_select_strategy="
                              f"{llava.get('vision_feature_select_strategy')!r}: ours uses every patch "
                              f"('full')")
    _require("vision.num_layers", cfg.vision.num_layers, "vision_feature_layer (layers used)",
             vision_layers_used(llava))
    _require("the projector activation", "gelu", "projector_hidden_act",
             llava.get("projector_hidden_act", "gelu"))
    _require("projector.merge", cfg.projector.merge, "spatial merge (LLaVA has none)", 1)
    _require("projector.hidden_size", cfg.projector.hidden_size or cfg.decoder.hidden_size,
             "text_config.hidden_size", llava["text_config"]["hidden_size"])
