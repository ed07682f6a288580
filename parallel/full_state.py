"""Full (unsharded) tensors under global names, from and into this rank's model chunks.

A parameter's global name is its name in the unpipelined model: decoder layers are renumbered from
the stage-local index to `layer_number - 1`. Tensor-parallel shards are cut and joined along the
parameter's `partition_dim`; pipeline stages exchange their pieces. Used to load one set of weights
into any layout and to compare parameters or gradients across layouts.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import TransformerLayer

_LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """{local parameter name: global name} for one model chunk."""
    numbers = {name: m.layer_number - 1 for name, m in chunk.named_modules()
               if isinstance(m, TransformerLayer)}
    out = {}
    for name, _ in chunk.named_parameters():
        m = _LAYER.match(name)
        layer = m and numbers.get(m.group(1) + m.group(2))
        out[name] = f"{m.group(1)}{layer}{m.group(3)}" if layer is not None else name
    return out


def _is_split(param: torch.Tensor) -> bool:
    tp = ps.get_tensor_model_parallel_world_size()
    return bool(getattr(param, "tensor_model_parallel", False)) and tp > 1


def _unshard(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Join the tensor-parallel shards of `value` (shaped like `param`) along its partition dim.
    With stride k (a gated MLP's fc1 has k=2: [gate; up]) the full tensor is k blocks, each split
    over the ranks, and rank r holds block pieces r, r+tp, ... back to back."""
    if not _is_split(param):
        return value.detach().clone()
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, value.detach().contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = [part.chunk(stride, dim=dim) for part in parts]  # [rank][block]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(len(parts))], dim=dim)


def _shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This tensor-parallel rank's piece of `full` (the inverse of `_unshard`)."""
    if not _is_split(param):
        return full
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = full.chunk(tp * stride, dim=dim)
    return torch.cat([pieces[k * tp + rank] for k in range(stride)], dim=dim)


def gather_full(chunks: list[torch.nn.Module], grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient: `main_grad` under megatron DDP) as a full CPU tensor under
    its global name; collective over the tensor- and pipeline-parallel groups."""
    mine = {}
    for chunk in chunks:
        names = global_names(chunk)
        for name, p in chunk.named_parameters():
            value = (getattr(p, "main_grad", None) if grads else p)
            if value is None:
                value = p.grad if grads and p.grad is not None else torch.zeros_like(p)
            mine[names[name]] = _unshard(p, value).cpu()
    pieces = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(pieces, mine, group=ps.get_pipeline_model_parallel_group())
    return {k: v for piece in pieces for k, v in piece.items()}


@torch.no_grad()
def load_full(chunks: list[torch.nn.Module], full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (global names) into this rank's shards; every parameter must be there."""
    for chunk in chunks:
        names = global_names(chunk)
        for name, p in chunk.named_parameters():
            if names[name] not in full:
                raise KeyError(f"no tensor for parameter {names[name]}")
            p.copy_(_shard(p, full[names[name]].to(p.device, p.dtype)))
