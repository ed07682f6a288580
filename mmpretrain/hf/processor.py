"""Tokenizer, processor and generation files of an export, so that `AutoProcessor` and
`generate` work on an image.

LLaVA exports (D at native resolution):
The tokenizer is the dataset's `tokenizer.json` wrapped as a `PreTrainedTokenizerFast`, with a
post-processor that puts the BOS token (`<s>` or the roles') first, as every training sample
begins. The processor is `PixtralProcessor` (`[IMG]` per patch, `[IMG_BREAK]` after each row,
`[IMG_END]` last: the layout `data/sequence.py` trains on) over a `PixtralImageProcessor` with
our CLIP mean/std.

The resize differs from ours: `data/images.py` scales an image to at most
`data.image_token_budget` patches (enlarging small ones up to `data.max_upscale`, flooring to whole
patches), HF Pixtral caps the longest edge (never enlarging, rounding up to whole patches). The
export sets the longest edge to the largest square within the budget, so HF never exceeds the
budget; non-square images get fewer patches than in training.

Remote-code exports (X, H, tiled or pixel-shuffled D): `processing_nvlm.NVLMProcessor`, whose
settings are the job's, resizes with the training code itself and writes each design's layout.
"""
from __future__ import annotations

from pathlib import Path

from mmpretrain.config import Config
from mmpretrain.data.resize import MEAN, STD
from mmpretrain.data.tokenizer import TextTokenizer
from mmpretrain.hf.configs import max_image_side


def hf_tokenizer(tok: TextTokenizer, max_length: int):
    """Our tokenizer as a PreTrainedTokenizerFast that prepends the BOS token."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    named = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": "<unk>",
             "pad_token": "<pad>"}
    inner = copy.deepcopy(tok.tokenizer)
    bos = {"id": "BOS", "ids": [tok.bos_id], "tokens": [tok.bos_token]}  # a name the template
    inner.post_processor = processors.TemplateProcessing(  # parses, whatever the token's text
        single=["BOS", "$A"], pair=["BOS", "$A", "BOS", "$B"], special_tokens=[bos])
    extra = [t for t in tok.specials if t not in named.values()]
    return PreTrainedTokenizerFast(tokenizer_object=inner, additional_special_tokens=extra,
                                   model_max_length=max_length,
                                   model_input_names=["input_ids", "attention_mask"], **named)


def hf_processor(cfg: Config, tokenizer):
    """PixtralProcessor with our patch size, image tokens and normalisation."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    p = cfg.vision.patch_size
    images = PixtralImageProcessor(
        size={"longest_edge": max_image_side(cfg)}, patch_size={"height": p, "width": p},
        image_mean=MEAN.tolist(), image_std=STD.tolist(), do_convert_rgb=True)
    return PixtralProcessor(image_processor=images, tokenizer=tokenizer, patch_size=p,
                            spatial_merge_size=cfg.projector.merge, image_token="[IMG]",
                            image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")


def generation_config(tok: TextTokenizer, vocab_size: int):
    """Greedy by default; the padding rows of the embedding (ids >= the tokenizer's size) are
    never generated."""
    from transformers import GenerationConfig

    pad_rows = list(range(tok.vocab_size, vocab_size))
    return GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                            do_sample=False, suppress_tokens=pad_rows or None)


def nvlm_processor(cfg: Config, tokenizer):
    """NVLMProcessor with the job's image settings; `auto_map` names it for AutoProcessor."""
    from mmpretrain.dataset import image_settings
    from mmpretrain.hf.processing_nvlm import NVLMProcessor

    s = image_settings(cfg)  # what the data path resizes with
    processor = NVLMProcessor(
        tokenizer, design=cfg.model.design, patch_size=s.patch_size, merge=s.merge, resize=s.policy,
        token_budget=s.token_budget, max_upscale=s.max_upscale, max_side=s.max_side,
        tile_size=s.tile_size, max_tiles=s.max_tiles, thumbnail=s.thumbnail)
    processor.auto_map = {"AutoProcessor": "processing_nvlm.NVLMProcessor"}
    return processor


def write_text_files(out: Path, cfg: Config, tok: TextTokenizer, vocab_size: int, fmt: str) -> None:
    """Tokenizer, processor and generation config files into `out`, for the export format `fmt`
    ('llava': PixtralProcessor; 'nvlm': NVLMProcessor, whose code `remote.write_code` ships)."""
    tokenizer = hf_tokenizer(tok, cfg.data.seq_length)
    make = hf_processor if fmt == "llava" else nvlm_processor
    make(cfg, tokenizer).save_pretrained(out)
    generation_config(tok, vocab_size).save_pretrained(out)
