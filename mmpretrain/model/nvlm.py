"""NVLM-D: vision encoder -> projector -> image embeddings placed in the decoder's token stream."""
from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from mmpretrain.data.packing import PackedBatch
from mmpretrain.model.decoder import LanguageDecoder
from mmpretrain.model.packed_attention import packed_seq_params
from mmpretrain.model.projector import Projector
from mmpretrain.model.vision import VisionEncoder


class NVLMDecoderOnly(MegatronModule):
    """The D design. `forward(batch)` returns the per-token loss [b, s] (or logits).

    One pipeline chunk of it: the vision encoder and projector exist only on the first stage
    (with the decoder's embedding); `vision` and `projector` are None elsewhere.
    """

    def __init__(self, vision: VisionEncoder | None, projector: Projector | None,
                 language_model: LanguageDecoder, image_token_id: int, thd: bool = True):
        super().__init__(language_model.config)  # the schedules read the decoder's config
        self.vision, self.projector, self.language_model = vision, projector, language_model
        self.pre_process = language_model.pre_process
        self.image_token_id = image_token_id
        self.thd = thd  # the decoder's samples as thd packed sequences (else a dense mask)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline hook: the previous stage's hidden states (None on the first stage)."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.language_model.block.set_input_tensor(input_tensor)

    def pipeline_shape(self, seq_len: int, micro_batch_size: int) -> tuple[int, int]:
        """(rows, columns) of the hidden states sent between pipeline stages, before megatron's
        division of the rows by tp under sequence parallel: [s, b] or, thd, [b*s, 1]."""
        return (seq_len * micro_batch_size, 1) if self.thd else (seq_len, micro_batch_size)

    def packing(self, batch: PackedBatch) -> dict:
        """How the decoder keeps packed samples apart: thd packed sequences or the dense mask."""
        if self.thd:
            return {"attention_mask": None,
                    "packed_seq_params": packed_seq_params(batch.decoder_seqlens(),
                                                           batch.tokens.device)}
        return {"attention_mask": batch.decoder_attention_mask(),  # [b, 1, s, s]
                "packed_seq_params": None}

    def image_embeddings(self, batch: PackedBatch) -> torch.Tensor:
        """All images of the micro-batch as one stream -> [n_image_tokens, h_decoder]."""
        sizes = batch.host.image_sizes  # [n_images, 2], read on the host
        features = self.vision(batch.patches, batch.patch_positions, sizes)  # [n, h_vision]
        return self.projector(features, sizes)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Token embeddings with image embeddings in place of the [IMG] tokens -> [s, b, h]."""
        emb = self.language_model.embed(batch.tokens)  # [s, b, h]
        slots = batch.image_slots(self.image_token_id)  # [n_slots]
        if len(batch.image_sizes) == 0:
            if len(slots):
                raise ValueError(f"{len(slots)} image tokens in the batch but no images")
            return emb
        return place_images(emb, slots, self.image_embeddings(batch))

    def forward(self, batch: PackedBatch, with_loss: bool = True) -> torch.Tensor:
        """Per-token loss [b, s] (with_loss) or vocab-parallel logits [b, s, v/tp] on the last
        stage; hidden states on a stage before it."""
        embeddings = self.embed(batch) if self.pre_process else None
        return self.language_model(embeddings, batch.position_ids,
                                   labels=batch.labels if with_loss else None,
                                   **self.packing(batch))


def place_images(emb: torch.Tensor, slots: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """emb [s, b, h] with images [n, h] at slots [n], positions in the flattened [b*s] rows."""
    if images.shape[0] != len(slots):
        raise ValueError(f"{len(slots)} image tokens but {images.shape[0]} image embeddings")
    s, b, h = emb.shape
    # The [s, b] order of emb differs from the slots' [b, s] order: place in [b*s, h].
    emb = emb.transpose(0, 1).reshape(b * s, h).index_copy(0, slots, images.to(emb.dtype))
    return emb.view(b, s, h).transpose(0, 1).contiguous()  # [s, b, h]
