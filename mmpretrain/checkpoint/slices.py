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
import math
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
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mmpretrain.checkpoint.files import CheckpointError, dcp_causes

Slot = tuple[str, tuple[int, ...]]  # (global key, offset of the slice)


class _Reader(dcp.FileSystemReader):
    """torch's file reader, reading the checkpoint's index (`.metadata`) once."""

    def read_metadata(self, *args, **kwargs):
        if not hasattr(self, "_index"):
            self._index = super().read_metadata(*args, **kwargs)
        return self._index


class _SlicePlanner(LoadPlanner):
    """Reads the slice (key, offset) of the checkpoint into each destination tensor."""

    def __init__(self, dests: dict[Slot, torch.Tensor]):
        self.dests = dests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items, covered = [], dict.fromkeys(self.dests, 0)
        for (key, offset), dest in self.dests.items():
            chunk = ChunkStorageMetadata(torch.Size(offset), dest.shape)
            for item in create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key],
                                                         [chunk]):
                items.append(item)
                covered[(key, offset)] += math.prod(item.lengths)
        for (key, offset), n in covered.items():
            if n != self.dests[(key, offset)].numel():
                raise CheckpointError(f"the checkpoint holds {n} of the {self.dests[(key, offset)].numel()}"
                                      f" values of {key} at {list(offset)}")
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"{read_item.dest_index.fqn}: saved as an object, not a tensor")

    def _view(self, read_item) -> torch.Tensor:
        dest = self.dests[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def resolve_tensor(self, read_item) -> torch.Tensor:
        return self._view(read_item)  # the reader copies the saved values into this view

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        view = self._view(read_item)
        if tensor.data_ptr() != view.data_ptr():  # a reader that filled a tensor of its own
            view.copy_(tensor)


def _slices(request: dict, allocate: bool) -> tuple[dict, dict, dict[Slot, torch.Tensor]]:
    """(request with new tensors, its factories, {slot: destination}); `allocate`: CPU tensors of
    the request's dtype, else meta ones (to check the request without memory)."""
    device = "cpu" if allocate else "meta"
    fresh = {name: dataclasses.replace(sh, data=torch.empty(sh.data.shape, dtype=sh.data.dtype,
                                                            device=device))
             for name, sh in request.items()}
    factories, _ = extract_matching_values(fresh, lambda x: isinstance(x, ShardedTensorFactory))
    apply_factories(fresh)  # a factory (SwiGLU's fc1) becomes the tensors it was saved as
    dests = {}
    for sh in nested_values(fresh):
        if not isinstance(sh, ShardedTensor) or sh.flattened_range is not None:
            raise CheckpointError(f"cannot read {sh.key} alone: not a plain sharded tensor")
        slot = (sh.key, tuple(sh.global_offset))
        if slot in dests:
            raise CheckpointError(f"{sh.key} at {list(sh.global_offset)} is asked for twice")
        dests[slot] = sh.data.view((1,) * sh.prepend_axis_num + sh.local_shape)
    return fresh, factories, dests


class CheckpointSlices:
    """The model tensors of the checkpoint at `path`, read a few at a time (`read`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = _Reader(str(self.path))

    def check(self, request: dict) -> None:
        """CheckpointError naming the first tensor of `request` the checkpoint cannot give whole."""
        saved = self.reader.read_metadata().state_dict_metadata
        for (key, offset), dest in _slices(request, allocate=False)[2].items():
            held = saved.get(key)
            if not isinstance(held, TensorStorageMetadata):
                raise CheckpointError(f"checkpoint {self.path} has no tensor {key} (the configured "
                                      f"model has it: does the config match the checkpoint's?)")
            if len(offset) != len(held.size) or any(o + n > s for o, n, s in
                                                    zip(offset, dest.shape, held.size)):
                raise CheckpointError(f"checkpoint {self.path} holds {key} with shape "
                                      f"{list(held.size)}; the configured model reads "
                                      f"{list(dest.shape)} at {list(offset)}")

    def read(self, request: dict) -> dict[str, torch.Tensor]:
        """{name: tensor} of `request` ({name: ShardedTensor or ShardedTensorFactory}, as a
        model's `sharded_state_dict()` gives them) in new CPU tensors of the request's dtype."""
        self.check(request)
        fresh, factories, dests = _slices(request, allocate=True)
        try:
            dcp.load({}, storage_reader=self.reader, planner=_SlicePlanner(dests), no_dist=True)
        except dcp.CheckpointException as e:
            causes = "; ".join(f"{type(c).__name__}: {c}" for c in dcp_causes(e))
            raise CheckpointError(f"checkpoint {self.path}: its tensors do not read ({causes})") from None
        dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedTensor) else x, fresh)
        return apply_factory_merges(fresh, factories)
