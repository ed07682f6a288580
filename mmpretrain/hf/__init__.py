"""Hugging Face conversion: export to transformers, import from it, and verification.

`mmpretrain convert to-hf` writes the D design at native resolution as
`transformers.LlavaForConditionalGeneration` (Pixtral vision tower, Llama decoder), and X, H,
tiled D and pixel-shuffled D as the remote-code `NVLMForConditionalGeneration`
(`configuration_nvlm.py`, `nvlm_layers.py`, `modeling_nvlm.py`, copied into the export; see
`remote.py`); `convert from-hf` reads either, or a Llama/Mistral causal LM plus an optional
Pixtral vision tower, into a checkpoint that `mmpretrain train` starts from; `convert verify`
compares the logits of both sides. The tensor names and layouts live in `mapping.py`.

This module stays import-light (no torch) so the CLI can name its errors cheaply.
"""
from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint or model that cannot be converted; the message names the tensor or field."""


class VerificationError(RuntimeError):
    """The converted model's logits differ from the source model's by more than the tolerance."""
