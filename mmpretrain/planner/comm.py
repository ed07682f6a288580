"""Communication time the planner adds to the compute time, counted as exposed (not overlapped).

Tensor parallelism (Narayanan et al. 2021, arXiv 2104.04473, section 3.2; Korthikanti et al.
2022 for the sequence-parallel form): each transformer layer all-reduces its [tokens, h] output
twice in the forward pass and twice in the backward pass (with sequence parallelism each
all-reduce becomes a reduce-scatter plus an all-gather: the same volume); a ring moves
2 (t - 1) / t of the tensor per GPU, over NVLink since tp stays inside a node. Overlap
(Transformer Engine's userbuffers) can hide part of it, so this errs slow.

Data parallelism: one reduction of the fp32 gradients per step (an all-reduce, or the distributed
optimizer's reduce-scatter + all-gather of the same volume), 2 (dp - 1) / dp of them per GPU. A
data-parallel group spans tp x dp consecutive ranks (tp fastest in megatron's rank order): over
NVLink when that fits in one node, else over the inter-node link. The DDP config has
`overlap_grad_reduce=False`, so it is exposed.

Pipeline parallelism: per micro-batch and model chunk, a stage sends its output forward and the
gradient of its input backward: one [s(/t), b, h] tensor each way (Narayanan et al. 2021), for X/H
with the image context rows appended (`workload.context_capacity` tokens, whole on every
tensor-parallel rank). Pipeline neighbours are tp x dp ranks apart in megatron's rank order
(tp fastest, pp slowest), so on another node as soon as tp x dp fills one. Counted as exposed.
"""
from __future__ import annotations

from mmpretrain.planner.hardware import GPU


def ring_bytes(size: float, ranks: int) -> float:
    """Bytes one GPU sends in a ring all-reduce of `size` bytes over `ranks` GPUs."""
    return 2 * (ranks - 1) / ranks * size if ranks > 1 else 0.0


def tp_seconds(layers: int, tokens: int, width: int, tp: int, act_bytes: int, grads: bool,
               gpu: GPU) -> float:
    """Exposed tensor-parallel time of `layers` layers over one micro-batch of `tokens`."""
    collectives = 4 if grads else 2
    return layers * collectives * ring_bytes(tokens * width * act_bytes, tp) / (gpu.nvlink_gbs * 1e9)


def dp_seconds(grad_params: int, tp: int, dp: int, gpus_per_node: int, gpu: GPU) -> float:
    """Exposed gradient reduction per step of a rank holding `grad_params` trainable parameters."""
    bandwidth = gpu.nvlink_gbs if tp * dp <= gpus_per_node else gpu.network_gbs
    return ring_bytes(grad_params * 4, dp) / (bandwidth * 1e9)


def p2p_bytes(tokens: int, width: int, tp: int, sp: bool, context_tokens: int, act_bytes: int) -> float:
    """Bytes of one tensor sent between pipeline stages: the hidden states ([s/t, b, h] under
    sequence parallelism) and the X/H image context rows."""
    return (tokens / (tp if sp else 1) + context_tokens) * width * act_bytes


def p2p_seconds(size: float, chunks: int, tp: int, dp: int, gpus_per_node: int, gpu: GPU) -> float:
    """Exposed pipeline communication of one micro-batch on a stage with `chunks` model chunks:
    one send forward and one backward of `size` bytes per chunk."""
    bandwidth = gpu.network_gbs if tp * dp >= gpus_per_node else gpu.nvlink_gbs
    return 2 * chunks * size / (bandwidth * 1e9)
