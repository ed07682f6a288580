"""NVLM-X and NVLM-H: image embeddings reach the decoder through gated cross-attention layers.

X: every image of the micro-batch is a key/value source; the token stream has one `<image>` marker
per image. H: tiled images; each thumbnail's embeddings are placed in the stream as in D (after its
`<tile_global_thumbnail>` tag), the regular tiles are keys/values, each anchored at its tile tag.
Both use the same PackedBatch: its `cross_attention_mask` says which image tokens a text token sees.
"""
from __future__ import annotations

import torch

from mmpretrain.data.images import THUMBNAIL
from mmpretrain.data.packing import PackedBatch
from mmpretrain.model.decoder import LanguageDecoder
from mmpretrain.model.nvlm import NVLMDecoderOnly, place_images
from mmpretrain.model.projector import Projector
from mmpretrain.model.vision import VisionEncoder


class NVLMCrossAttention(NVLMDecoderOnly):
    """The X (design='x') and H (design='h') designs; `forward(batch)` as in D."""

    def __init__(self, vision: VisionEncoder | None, projector: Projector | None,
                 language_model: LanguageDecoder, image_token_id: int, design: str, merge: int):
        super().__init__(vision, projector, language_model, image_token_id)
        self.design, self.merge = design, merge

    def in_stream(self, batch: PackedBatch) -> torch.Tensor:
        """[n_images] bool: images placed in the token stream (H's thumbnails), not cross-attended."""
        if self.design == "h":
            return batch.image_tiles == THUMBNAIL
        return torch.zeros(len(batch.image_sizes), dtype=torch.bool, device=batch.tokens.device)

    def tokens_per_image(self, batch: PackedBatch) -> torch.Tensor:
        """[n_images] projected tokens of each image."""
        sizes = batch.image_sizes
        return (sizes[:, 0] // self.merge) * (sizes[:, 1] // self.merge)

    def embed_and_context(self, batch: PackedBatch) -> torch.Tensor:
        """Token embeddings [s, b, h] (thumbnails placed); sets the cross-attention context."""
        emb = self.language_model.embed(batch.tokens)  # [s, b, h]
        in_stream = self.in_stream(batch)  # [n_images]
        if len(batch.image_sizes):
            images = self.image_embeddings(batch)  # [n_tokens, h]
        else:
            images = emb.new_zeros(0, emb.shape[-1])
        token_in_stream = in_stream.repeat_interleave(self.tokens_per_image(batch))  # [n_tokens]
        slots = (batch.tokens == self.image_token_id).t()  # [s, b]
        emb = place_images(emb, slots, images[token_in_stream]) if self.design == "h" else emb
        mask = batch.cross_attention_mask(~in_stream, self.merge)  # [b, 1, s, k]
        self.language_model.set_cross_context(images[~token_in_stream].to(emb.dtype), mask)
        return emb

    def forward(self, batch: PackedBatch, with_loss: bool = True) -> torch.Tensor:
        """Per-token loss [b, s] (with_loss) or vocab-parallel logits [b, s, v/tp]."""
        if not self.pre_process:
            raise NotImplementedError("X/H under pipeline parallelism: the image context is not "
                                      "sent to later stages yet")
        embeddings = self.embed_and_context(batch)
        return self.language_model(embeddings, batch.position_ids, batch.decoder_attention_mask(),
                                   batch.labels if with_loss else None)
