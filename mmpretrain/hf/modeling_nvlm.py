"""NVLM-D/X/H for transformers: Pixtral vision tower -> projector -> Llama decoder, with gated
cross-attention layers for X and H. Remote code written by mmpretrain (torch + transformers only):

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

Inputs: `input_ids` and, with images, `pixel_values` [n, 3, H, W] (normalised, zero-padded to the
largest), `image_sizes` [n, 2] in pixels (multiples of patch_size x merge) and, for X with tiled
images, `image_tiles` [n] (0: a whole image, k >= 1: its k-th tile, -1: its global thumbnail).
The export's `NVLMProcessor` (`processing_nvlm.py`) makes all of them from text and images.
Tiles and thumbnails are images; all come in the order their tokens appear, row after row:
    D: an image's projected tokens replace `[IMG]` tokens, in order.
    X: cross-attended; an image and its tiles belong to the next `<image>` marker.
    H: the i-th image belongs to the i-th tile tag; a thumbnail (`<tile_global_thumbnail>`)
       replaces `[IMG]` tokens as in D, a tile (`<tile_k>`) is cross-attended.
A token cross-attends to the image tokens of its row whose marker or tag is at or before it; a
token with no such image gets exactly zero from both gated sub-layers. `generate` works greedy or
sampling (the image context is kept between steps; beam search is not supported).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import ModelOutput
from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

from .configuration_nvlm import NVLMConfig
from .nvlm_layers import ImageContext, NVLMCrossAttentionLayer, NVLMLanguageModel, NVLMProjector

THUMBNAIL = -1


@dataclass
class NVLMCausalLMOutput(ModelOutput):
    """Logits [b, q, vocab] (and the loss with labels); the cache and, for X/H, the image context
    that later generation steps cross-attend to."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    image_context: ImageContext | None = None


class NVLMPreTrainedModel(PreTrainedModel):
    config_class = NVLMConfig
    base_model_prefix = "nvlm"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LlamaDecoderLayer", "NVLMCrossAttentionLayer", "PixtralAttentionLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.text_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, NVLMCrossAttentionLayer):
            module.cross_attn_attn_gate.data.zero_()  # an untrained layer is the identity
            module.cross_attn_mlp_gate.data.zero_()
        elif type(module).__name__.endswith("RMSNorm"):
            module.weight.data.fill_(1.0)


def route_images(config: NVLMConfig, input_ids: torch.Tensor, n_images: int,
                 image_tiles: torch.Tensor | None):
    """Per image: (placed in the token stream [n] bool, batch row [n], anchor position [n])."""
    device = input_ids.device
    none = torch.zeros(n_images, dtype=torch.long, device=device)
    if config.design == "d":
        return torch.ones(n_images, dtype=torch.bool, device=device), none, none
    if config.design == "x":
        markers = (input_ids == config.image_marker_index).nonzero()  # [m, 2] row-major
        tiles = none if image_tiles is None else image_tiles.to(device)
        group = ((tiles == 0) | (tiles == 1)).long().cumsum(0) - 1  # [n] the marker of each image
        if n_images and (group[0] < 0 or int(group[-1]) + 1 != len(markers)):
            raise ValueError(f"{len(markers)} <image> markers for {n_images} images (tiled images "
                             f"need image_tiles: 1..N per tile, -1 for the thumbnail)")
        anchor = markers[group]  # [n, 2]
        return torch.zeros(n_images, dtype=torch.bool, device=device), anchor[:, 0], anchor[:, 1]
    tags = torch.tensor(config.tile_token_ids + [config.thumbnail_token_index], device=device)
    found = torch.isin(input_ids, tags).nonzero()  # [n, 2] row-major
    if len(found) != n_images:
        raise ValueError(f"{len(found)} tile tags for {n_images} images (one tag per tile and "
                         f"thumbnail)")
    thumbnail = input_ids[found[:, 0], found[:, 1]] == config.thumbnail_token_index
    return thumbnail, found[:, 0], found[:, 1]


class NVLMForConditionalGeneration(NVLMPreTrainedModel, GenerationMixin):
    """The whole model; on-disk names as LLaVA's (`vision_tower.*`, `multi_modal_projector.*`,
    `language_model.model.*`, `language_model.lm_head.weight`), plus
    `language_model.model.cross_attention_layers.{i}.*` before decoder layer i (X and H)."""

    def __init__(self, config: NVLMConfig):
        super().__init__(config)
        self.vision_tower = PixtralVisionModel(config.vision_config)
        self.multi_modal_projector = NVLMProjector(config)
        self.language_model = NVLMLanguageModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.language_model.lm_head

    def set_output_embeddings(self, value):
        self.language_model.lm_head = value

    def get_decoder(self):
        return self.language_model.model

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None):
        """(projected image tokens [t, h], tokens per image [n])."""
        p, m = self.config.vision_config.patch_size, self.config.merge
        if image_sizes is None:
            image_sizes = torch.tensor([pixel_values.shape[-2:]] * len(pixel_values))
        grids = [(h // p, w // p) for h, w in image_sizes.tolist()]
        dtype = self.vision_tower.patch_conv.weight.dtype
        features = self.vision_tower(pixel_values.to(dtype), image_sizes=image_sizes).last_hidden_state[0]
        counts = torch.tensor([(r // m) * (c // m) for r, c in grids], device=features.device)
        return self.multi_modal_projector(features, grids), counts

    def image_rows(self, input_ids, pixel_values, image_sizes, image_tiles) -> torch.Tensor:
        """The batch row of each image [n]: X and H's by their markers and tags, D's by the
        `[IMG]` tokens its image tokens fill, row after row."""
        n = len(pixel_values)
        if self.config.design != "d":
            return route_images(self.config, input_ids, n, image_tiles)[1].cpu()
        p, m = self.config.vision_config.patch_size, self.config.merge
        sizes = image_sizes.tolist() if image_sizes is not None else [pixel_values.shape[-2:]] * n
        counts = torch.tensor([(h // p // m) * (w // p // m) for h, w in sizes])  # [n]
        first = counts.cumsum(0) - counts  # [n] the index of each image's first [IMG] token
        ends = (input_ids == self.config.image_token_index).sum(1).cumsum(0).cpu()  # [b]
        return torch.searchsorted(ends, first, right=True)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """GenerationMixin's (num_return_sequences > 1), with each row's images repeated as a
        group (a, b, a, b) where it would repeat each image (a, a, b, b) and so hand row 0's
        second image to row 1's copy."""
        names = ("pixel_values", "image_sizes", "image_tiles")
        images = {k: model_kwargs.pop(k) for k in names if k in model_kwargs}
        pixels = images.get("pixel_values")
        if expand_size > 1 and input_ids is not None and pixels is not None and len(pixels):
            rows = self.image_rows(input_ids, pixels, images.get("image_sizes"),
                                   images.get("image_tiles"))
            order = torch.cat([(rows == r).nonzero()[:, 0] for r in range(len(input_ids))
                               for _ in range(expand_size)])
            images = {k: v if v is None else v[order.to(v.device)] for k, v in images.items()}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids,
            **model_kwargs)
        return input_ids, {**model_kwargs, **images}

    def embed_images(self, input_ids, inputs_embeds, pixel_values, image_sizes, image_tiles):
        """(embeddings with in-stream images placed, the image context of cross-attended ones)."""
        if input_ids is None:
            raise ValueError("images need input_ids (their tokens say where the images go)")
        images, counts = self.image_features(pixel_values, image_sizes)
        in_stream, rows, anchors = route_images(self.config, input_ids, len(counts), image_tiles)
        token_in_stream = in_stream.repeat_interleave(counts)  # [t]
        slots = input_ids == self.config.image_token_index  # [b, q]
        placed = images[token_in_stream]
        if int(slots.sum()) != len(placed):
            raise ValueError(f"{int(slots.sum())} [IMG] tokens for {len(placed)} image tokens")
        inputs_embeds = inputs_embeds.masked_scatter(slots[..., None], placed.to(inputs_embeds.dtype))
        if self.config.design == "d":
            return inputs_embeds, None
        cross = ~token_in_stream
        return inputs_embeds, ImageContext(images[cross], rows.repeat_interleave(counts)[cross],
                                           anchors.repeat_interleave(counts)[cross])

    def forward(self, input_ids: torch.LongTensor | None = None,
                pixel_values: torch.FloatTensor | None = None,
                image_sizes: torch.Tensor | None = None, image_tiles: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                past_key_values: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None,
                image_context: ImageContext | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                cache_position: torch.LongTensor | None = None, logits_to_keep: int = 0,
                **kwargs) -> NVLMCausalLMOutput:
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None and len(pixel_values):
            inputs_embeds, image_context = self.embed_images(input_ids, inputs_embeds, pixel_values,
                                                             image_sizes, image_tiles)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config.text_config)
        hidden = self.language_model.model(inputs_embeds, attention_mask=attention_mask,
                                           position_ids=position_ids, past_key_values=past_key_values,
                                           cache_position=cache_position, context=image_context,
                                           **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.language_model.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return NVLMCausalLMOutput(loss, logits, past_key_values, image_context)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, cache_position=None, pixel_values=None,
                                      image_sizes=None, image_tiles=None, image_context=None,
                                      **kwargs):
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, cache_position=cache_position, **kwargs)
        if cache_position is None or int(cache_position[0]) == 0:  # the prompt: images enter
            inputs.update(pixel_values=pixel_values, image_sizes=image_sizes, image_tiles=image_tiles)
        else:  # later steps cross-attend to what the prompt computed
            inputs["image_context"] = image_context
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if getattr(outputs, "image_context", None) is not None:
            model_kwargs["image_context"] = outputs.image_context
        return model_kwargs


__all__ = ["NVLMForConditionalGeneration", "NVLMPreTrainedModel"]
