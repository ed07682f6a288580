"""Language decoder: vocab-parallel embedding, megatron TransformerBlock, vocab-parallel output."""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mmpretrain.model.rope import text_rope
from mmpretrain.model.specs import decoder_layer_spec


class LanguageDecoder(MegatronModule):
    """Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA), untied input and output embeddings."""

    def __init__(self, config: TransformerConfig, vocab_size: int, max_seq_len: int,
                 rope_theta: float):
        super().__init__(config)
        self.vocab_size, self.rope_theta = vocab_size, rope_theta
        # Embeddings stay [s, b, h] unscattered so images can be placed before sequence parallel.
        self.embedding = LanguageModelEmbedding(config, vocab_size, max_seq_len,
                                                position_embedding_type="rope",
                                                scatter_to_sequence_parallel=False)
        self.block = TransformerBlock(config, decoder_layer_spec(), post_layer_norm=True)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method,
            bias=False, gather_output=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> embeddings [s, b, h]."""
        return self.embedding(tokens, position_ids=None)

    def forward(self, embeddings: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """embeddings [s, b, h] -> per-token loss [b, s] if labels else logits [b, s, v/tp]."""
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        rope = text_rope(position_ids, self.config.kv_channels, self.rope_theta)  # [s, b, 1, d]
        hidden = self.block(embeddings, attention_mask, rotary_pos_emb=rope)  # [s, b, h]
        logits, _ = self.output_layer(hidden)  # [s, b, v/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous())
        return loss.t().contiguous()  # [b, s]
