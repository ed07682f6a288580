"""Reading some of a checkpoint's model tensors without the rest.

megatron's `dist_checkpointing.load` in one process expects every shard of each tensor it is asked
for (a decoder tensor holds all layers: [layers, ...]), so it cannot read one layer alone. Here
torch's checkpoint reader fills exactly the slices asked for: each requested ShardedTensor (its
global key, offset and shape, from a model's `sharded_state_dict()`, which may live on the meta
device) is read into a fresh tensor, whatever layout saved the checkpoint. An export reads one
output shard's tensors at a time this way, so the whole model is never in memory.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.dict_utils import (
    dict_list_map_inplace,
    extract_matching_values,
    nested_values,
)
from megatron.core.dist_checkpointing.mapping import (
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
    apply_factory_merges,
)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mmpretrain.checkpoint.files import CheckpointError


class _SlicePlanner(LoadPlanner):
    """Reads the chunk (key, offsets) of the checkpoint into each destination tensor."""

    def __init__(self, dests: dict[tuple[str, tuple[int, ...]], torch.Tensor]):
        self.dests = dests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (key, offsets), dest in self.dests.items():
            saved = self.metadata.state_dict_metadata.get(key)
            if saved is None:
                raise CheckpointError(f"the checkpoint has no tensor {key}")
            chunk = ChunkStorageMetadata(torch.Size(offsets), dest.shape)
            items += create_read_items_for_chunk_list(key, saved, [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"{read_item.dest_index.fqn}: saved as an object, not a tensor")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self.dests[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest  # the reader copies the saved bytes into this view

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        pass


def read_tensors(path: str | Path, request: dict) -> dict[str, torch.Tensor]:
    """{name: tensor} of `request` ({name: ShardedTensor or ShardedTensorFactory}, as a model's
    `sharded_state_dict()` gives them), read from the checkpoint at `path` into new CPU tensors
    of the request's dtype."""
    fresh = {name: dataclasses.replace(sh, data=torch.empty(sh.data.shape, dtype=sh.data.dtype))
             for name, sh in request.items()}
    factories, _ = extract_matching_values(fresh, lambda x: isinstance(x, ShardedTensorFactory))
    apply_factories(fresh)  # a factory (SwiGLU's fc1) becomes the tensors it was saved as
    dests = {}
    for sh in nested_values(fresh):
        if not isinstance(sh, ShardedTensor) or sh.flattened_range is not None:
            raise CheckpointError(f"cannot read {sh.key} alone: not a plain sharded tensor")
        dests[(sh.key, tuple(sh.global_offset))] = sh.data.view((1,) * sh.prepend_axis_num + sh.local_shape)
    dcp.load({}, storage_reader=dcp.FileSystemReader(str(path)), planner=_SlicePlanner(dests),
             no_dist=True)
    dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedTensor) else x, fresh)
    return apply_factory_merges(fresh, factories)
