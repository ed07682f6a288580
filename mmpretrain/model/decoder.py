"""Language decoder: vocab-parallel embedding, megatron TransformerBlock, vocab-parallel output.

Under pipeline parallelism a stage holds the embedding only if it is the first (pre_process) and
the final norm, output layer and loss only if it is the last (post_process); its block holds its
share of the layers, and other stages' hidden states arrive through `set_input_tensor`.
"""
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
                 rope_theta: float, pre_process: bool = True, post_process: bool = True,
                 vp_stage: int | None = None):
        super().__init__(config)
        self.vocab_size, self.rope_theta = vocab_size, rope_theta
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            # Stays [s, b, h] unscattered so images can be placed before sequence parallel.
            self.embedding = LanguageModelEmbedding(config, vocab_size, max_seq_len,
                                                    position_embedding_type="rope",
                                                    scatter_to_sequence_parallel=False)
        self.block = TransformerBlock(config, decoder_layer_spec(), post_layer_norm=post_process,
                                      pre_process=pre_process, post_process=post_process,
                                      vp_stage=vp_stage)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, init_method=config.init_method,
                bias=False, gather_output=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> embeddings [s, b, h]."""
        return self.embedding(tokens, position_ids=None)

    def forward(self, embeddings: torch.Tensor | None, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """embeddings [s, b, h] (first stage; None elsewhere) -> per-token loss [b, s] or logits
        [b, s, v/tp] on the last stage, hidden states [s(/tp), b, h] on the others."""
        if embeddings is not None and self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        rope = text_rope(position_ids, self.config.kv_channels, self.rope_theta)  # [s, b, 1, d]
        hidden = self.block(embeddings, attention_mask, rotary_pos_emb=rope)  # [s, b, h]
        if not self.post_process:
            return hidden
        logits, _ = self.output_layer(hidden)  # [s, b, v/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous())
        return loss.t().contiguous()  # [b, s]
