"""The image context of the X and H designs under pipeline parallelism.

The context (the micro-batch's cross-attended image embeddings, [k, h]) travels to the next stage
with the hidden states, as extra rows of the one tensor megatron's schedules send:
[s(/tp) + m, b, h], where the m rows hold `capacity` context tokens (zero-padded) laid out as
[m, b, h]. Every stage appends what it received (the first stage what it computed); the gradient
that comes back for those rows is the later stages' gradient of the context, so the encoder and
projector train through the pipeline. Under sequence parallel every TP rank sends the whole
context after its share of the sequence.
"""
from __future__ import annotations

import math

import torch


def context_rows(capacity: int, micro_batch_size: int) -> int:
    """m: rows of [m, b, h] that hold `capacity` context tokens."""
    return math.ceil(capacity / micro_batch_size)


def pack_context(context: torch.Tensor, capacity: int, micro_batch_size: int) -> torch.Tensor:
    """context [n, h] -> [m, b, h], zero-padded to `capacity` tokens and beyond to m*b."""
    n, h = context.shape
    if n > capacity:
        raise ValueError(f"{n} cross-attended image tokens in a micro-batch, over the pipeline's "
                         f"context capacity of {capacity} (data.max_patches / projector.merge^2)")
    rows = context_rows(capacity, micro_batch_size)
    padded = torch.cat([context, context.new_zeros(rows * micro_batch_size - n, h)])
    return padded.view(rows, micro_batch_size, h)


def unpack_context(rows: torch.Tensor, n: int) -> torch.Tensor:
    """[m, b, h] as sent by `pack_context` -> the context [n, h]."""
    return rows.reshape(-1, rows.shape[-1])[:n]
