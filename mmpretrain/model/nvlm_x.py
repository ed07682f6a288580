"""NVLM-X and NVLM-H: image embeddings reach the decoder through gated cross-attention layers.

X: every image of the micro-batch is a key/value source; the token stream has one `<image>` marker
per image. H: tiled images; each thumbnail's embeddings are placed in the stream as in D (after its
`<tile_global_thumbnail>` tag), the regular tiles are keys/values, each anchored at its tile tag.
Both use the same PackedBatch: `cross_attention_rows` gives each row its own images' tokens and
says which of them a text token sees.
"""
from __future__ import annotations

import torch

from mmpretrain.config import FP8_MULTIPLE
from mmpretrain.data.packing import PackedBatch
from mmpretrain.model.decoder import LanguageDecoder
from mmpretrain.model.image_context import context_rows, pack_context, unpack_context
from mmpretrain.model.nvlm import NVLMDecoderOnly, place_images
from mmpretrain.model.projector import Projector
from mmpretrain.model.vision import VisionEncoder


class NVLMCrossAttention(NVLMDecoderOnly):
    """The X (design='x') and H (design='h') designs; `forward(batch)` as in D.

    `context_capacity`: the most cross-attended image tokens of one micro-batch (data.max_patches
    / merge^2); under pipeline parallelism the context rows sent between stages hold this many.
    """

    def __init__(self, vision: VisionEncoder | None, projector: Projector | None,
                 language_model: LanguageDecoder, image_token_id: int, design: str, merge: int,
                 context_capacity: int = 0, thd: bool = True):
        super().__init__(vision, projector, language_model, image_token_id, thd)
        self.design, self.merge, self.context_capacity = design, merge, context_capacity
        self.pipelined = self.config.pipeline_model_parallel_size > 1
        if self.pipelined and context_capacity <= 0:
            raise ValueError("pipeline parallelism of X/H needs a context capacity "
                             "(data.max_patches > 0)")
        self.received: torch.Tensor | None = None

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline hook: the previous stage's hidden states and context rows, [s(/tp) + m, b, h]
        (thd: [b*s(/tp) + m, 1, h])."""
        self.received = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def pipeline_shape(self, seq_len: int, micro_batch_size: int) -> tuple[int, int]:
        """(rows, columns) of the tensor sent between stages, before megatron divides the rows by
        tp under sequence parallel: the hidden states and the context rows (full on every TP
        rank)."""
        rows, cols = super().pipeline_shape(seq_len, micro_batch_size)
        if not self.pipelined:
            return rows, cols
        tp = self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
        return rows + context_rows(self.context_capacity, cols) * tp, cols

    def in_stream(self, batch: PackedBatch) -> torch.Tensor:
        """[n_images] bool (host memory): images placed in the token stream (H's thumbnails), not
        cross-attended."""
        return batch.images_in_stream(self.design)

    def tokens_per_image(self, batch: PackedBatch) -> torch.Tensor:
        """[n_images] projected tokens of each image (host memory)."""
        return batch.tokens_per_image(self.merge)

    def embed_and_context(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeddings [s, b, h] with H's thumbnails placed, cross-attended context [k, h])."""
        emb = self.language_model.embed(batch.tokens)  # [s, b, h]
        in_stream = self.in_stream(batch)  # [n_images]
        if len(batch.image_sizes):
            images = self.image_embeddings(batch).to(emb.dtype)  # [n_tokens, h]
        else:
            images = emb.new_zeros(0, emb.shape[-1])
        token_in_stream = in_stream.repeat_interleave(self.tokens_per_image(batch))  # [n_tokens]
        if self.design == "h":
            placed = batch.from_host(token_in_stream.nonzero()[:, 0])  # [n_placed]
            emb = place_images(emb, batch.image_slots(self.image_token_id),
                               images.index_select(0, placed))
        return emb, images.index_select(0, batch.from_host((~token_in_stream).nonzero()[:, 0]))

    def received_parts(self, n_context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The received tensor split: (hidden [s(/tp), b, h], context [n, h], its rows [m, b, h])
        (thd: [b*s(/tp), 1, h] and [m, 1, h])."""
        rows = context_rows(self.context_capacity, self.received.shape[1])
        s_local = self.received.shape[0] - rows
        carried = self.received[s_local:]
        return self.received[:s_local], unpack_context(carried, n_context), carried

    def forward(self, batch: PackedBatch, with_loss: bool = True) -> torch.Tensor:
        """Per-token loss [b, s] (with_loss) or vocab-parallel logits [b, s, v/tp] on the last
        stage; hidden states and context rows [s(/tp) + m, b, h] on a stage before it."""
        cross = ~self.in_stream(batch)  # [n_images]
        multiple = FP8_MULTIPLE if self.language_model.config.fp8 else 1
        index, mask = batch.cross_attention_rows(cross, self.merge, multiple)  # [b, kr], [b, 1, s, kr]
        if self.pre_process:
            hidden, context = self.embed_and_context(batch)
            carried = None
        else:  # the previous stage's hidden states reach the block through set_input_tensor
            n_context = int(self.tokens_per_image(batch)[cross].sum())
            received, context, carried = self.received_parts(n_context)
            self.language_model.block.set_input_tensor(received)
            hidden = None
        keys = context[index].transpose(0, 1)  # [kr, b, h]: each row's own images
        out = self.language_model(hidden, batch.position_ids,
                                  labels=batch.labels if with_loss else None, context=keys,
                                  context_mask=mask, **self.packing(batch))
        if self.language_model.post_process:
            return out
        if carried is None:
            carried = pack_context(context, self.context_capacity, out.shape[1])
        return torch.cat([out, carried.to(out.dtype)])  # [s(/tp) + m, b, h] (thd: [.., 1, h])
