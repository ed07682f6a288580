"""Language decoder: vocab-parallel embedding, megatron TransformerBlock, vocab-parallel output.

Under pipeline parallelism a stage holds the embedding only if it is the first (pre_process) and
the final norm, output layer and loss only if it is the last (post_process); its block holds its
share of the layers, and other stages' hidden states arrive through `set_input_tensor`.

The X and H designs add gated cross-attention layers: the one before global decoder layer L is the
attribute `cross_attention_L` (a stable, layout-independent checkpoint name) and runs as a forward
pre-hook of that TransformerLayer, so megatron's TransformerBlock stays as it is; the image context
reaches it as the block's own `context`/`context_mask` arguments.
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mmpretrain.model.cross_attention import GatedCrossAttentionLayer
from mmpretrain.model.packed_attention import to_thd
from mmpretrain.model.rope import text_rope, with_rope
from mmpretrain.model.specs import LayerSpecs, layer_specs, without_wgrad_fusion


def make_embedding(config: TransformerConfig, vocab_size: int,
                   max_seq_len: int) -> LanguageModelEmbedding:
    """The word embeddings; they stay [s, b, h] unscattered so images can be placed before
    sequence parallel."""
    return LanguageModelEmbedding(config, vocab_size, max_seq_len, position_embedding_type="rope",
                                  scatter_to_sequence_parallel=False)


def make_output_layer(config: TransformerConfig, vocab_size: int):
    """The output projection to the (tensor-parallel split) vocabulary."""
    return tensor_parallel.ColumnParallelLinear(
        config.hidden_size, vocab_size, config=without_wgrad_fusion(config),
        init_method=config.init_method, bias=False, gather_output=False)


class LanguageDecoder(MegatronModule):
    """Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA), untied input and output embeddings."""

    def __init__(self, config: TransformerConfig, vocab_size: int, max_seq_len: int,
                 rope_theta: float, pre_process: bool = True, post_process: bool = True,
                 vp_stage: int | None = None, cross_positions: tuple[int, ...] = (),
                 specs: LayerSpecs | None = None):
        super().__init__(config)
        specs = specs or layer_specs("local")
        self.vocab_size, self.rope_theta = vocab_size, rope_theta
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            self.embedding = make_embedding(config, vocab_size, max_seq_len)
        self.block = TransformerBlock(config, specs.decoder_layer, post_layer_norm=post_process,
                                      pre_process=pre_process, post_process=post_process,
                                      vp_stage=vp_stage)
        self.cross_layers = self._add_cross_layers(config, set(cross_positions), specs)
        if post_process:
            self.output_layer = make_output_layer(config, vocab_size)

    def _add_cross_layers(self, config: TransformerConfig, positions: set[int],
                          specs: LayerSpecs) -> list[GatedCrossAttentionLayer]:
        """A gated cross-attention layer before each of this stage's layers in `positions`."""
        added = []
        for layer in self.block.layers:
            if layer.layer_number in positions:
                cross = GatedCrossAttentionLayer(config, specs)
                setattr(self, f"cross_attention_{layer.layer_number}", cross)
                layer.register_forward_pre_hook(_run_before(cross), with_kwargs=True)
                added.append(cross)
        return added

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> embeddings [s, b, h]."""
        return self.embedding(tokens, position_ids=None)

    def forward(self, embeddings: torch.Tensor | None, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        """embeddings [s, b, h] (first stage; None elsewhere) -> per-token loss [b, s] or logits
        [b, s, v/tp] on the last stage, hidden states [s(/tp), b, h] on the others.

        Packed samples attend within themselves through `attention_mask` [b, 1, s, s] or, with
        `packed_seq_params` (thd, one sequence per run of `PackedBatch.decoder_seqlens`), as
        megatron's thd layout: the rows laid end to end, [b*s(/tp), 1, h] between stages.

        X/H: `context` [kr, b, h] (each row's image keys/values) and `context_mask`
        [b, 1, s, kr] for the cross-attention layers. They go through megatron's block as its own
        cross-attention arguments, so its activation recomputation saves and reuses them with
        the micro-batch."""
        b, s = position_ids.shape
        thd = packed_seq_params is not None
        if embeddings is not None and thd:
            embeddings = to_thd(embeddings)  # [b*s, 1, h]
        if embeddings is not None and self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        rope = text_rope(position_ids, self.config.kv_channels, self.rope_theta)  # [s, b, 1, d]
        if thd:  # the core attention rotates the whole stream: [b*s, 1, 1, d] per token
            packed_seq_params, rope = with_rope(packed_seq_params, to_thd(rope)), None
        hidden = self.block(embeddings, attention_mask, context=context, context_mask=context_mask,
                            rotary_pos_emb=rope, packed_seq_params=packed_seq_params)
        if not self.post_process:
            return hidden  # [s(/tp), b, h] or [b*s(/tp), 1, h]
        logits, _ = self.output_layer(hidden)  # [s, b, v/tp] or, thd, [b*s, 1, v/tp]
        if thd:  # rows end to end: the [b, s] order already
            if labels is None:
                return logits.view(b, s, -1)
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.view(-1, 1))
            return loss.view(b, s)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous())
        return loss.t().contiguous()  # [b, s]


def _run_before(cross: GatedCrossAttentionLayer):
    """Forward pre-hook: pass the layer's input hidden states through `cross` first, with the
    block's `context` and `context_mask` (megatron passes all three by keyword)."""
    def hook(module, args, kwargs):
        kwargs["hidden_states"] = cross(kwargs["hidden_states"], kwargs.get("context"),
                                        kwargs.get("context_mask"))
        return args, kwargs
    return hook
