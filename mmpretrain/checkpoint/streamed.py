"""Writing a model checkpoint one tensor at a time, each computed when its turn comes.

megatron's `dist_checkpointing.save` takes a state dict of tensors that all exist. A conversion
from Hugging Face weights would then hold the whole model; here each model tensor is asked of a
function (`value(name)`) only when torch's checkpoint writer reaches it, and written to a file of
at most `file_bytes` (one tensor larger than that gets a file of its own), so memory follows the
file size, not the model. The files are the ones megatron's `torch_dist` backend writes (torch's
`.metadata` and `__0_N.distcp`, `common.pt`, `metadata.json`): each tensor is saved under its
global key as the model's `sharded_state_dict()` names it (a factory as the tensors it builds),
so any layout loads it.
"""
from __future__ import annotations

import dataclasses
import io
import queue
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from mmpretrain.checkpoint.files import CheckpointError, dcp_causes

Slot = tuple[str, tuple[int, ...]]  # (global key, offset), as in checkpoint/slices.py
FILE_BYTES = 256 * 2**20  # the data files' size: a 72B model in bf16 is ~560 of them


def pieces(sh, data: torch.Tensor) -> list[ShardedTensor]:
    """The ShardedTensors `sh` (a ShardedTensor or a factory, as `sharded_state_dict()` gives
    it) is saved as, holding `data` (a meta tensor will do)."""
    sh = dataclasses.replace(sh, data=data)
    if isinstance(sh, ShardedTensorFactory):
        out = list(nested_values(sh.build()))
    else:
        out = [sh]
    for piece in out:
        if not isinstance(piece, ShardedTensor) or piece.flattened_range is not None:
            raise CheckpointError(f"cannot write {sh.key} alone: not a plain sharded tensor")
    return out


def _meta(sh) -> torch.Tensor:
    return torch.empty(sh.data.shape, dtype=sh.data.dtype, device="meta")


def _write_item(piece: ShardedTensor) -> WriteItem:
    shape = (1,) * piece.prepend_axis_num + tuple(piece.local_shape)  # the stacked layer axes
    return WriteItem(
        index=MetadataIndex(piece.key, torch.Size(piece.global_offset)), type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(torch.Size(piece.global_offset), torch.Size(shape)),
            properties=TensorProperties(dtype=piece.data.dtype), size=torch.Size(piece.global_shape)))


class _Planner(SavePlanner):
    """Plans every slot of `request`; resolves a slot by asking `value` for its model tensor.
    ShardedObjects (layers' `_extra_state`) are written as megatron writes them: the pickled
    list of the object, under its unique key."""

    def __init__(self, request: dict, value: Callable[[str], torch.Tensor]):
        self.request, self.value = request, value
        self.items, self.origin, self.objects = [], {}, {}  # slot -> model tensor name
        for name, sh in request.items():
            if isinstance(sh, ShardedObject):
                self.objects[sh.unique_key] = sh.data
                self.items.append(WriteItem(index=MetadataIndex(sh.unique_key),
                                            type=WriteItemType.BYTE_IO))
                continue
            for piece in pieces(sh, _meta(sh)):
                slot = (piece.key, tuple(piece.global_offset))
                if slot in self.origin:
                    raise CheckpointError(f"{piece.key} at {list(slot[1])} is written twice "
                                          f"({self.origin[slot]} and {name})")
                self.origin[slot] = name
                self.items.append(_write_item(piece))
        self._last: tuple[str, dict[Slot, torch.Tensor]] | None = None

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self.items)

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def _computed(self, name: str) -> dict[Slot, torch.Tensor]:
        """{slot: data} of model tensor `name`, computed once for its consecutive slots."""
        if self._last is None or self._last[0] != name:
            self._last = None  # the previous tensor's memory goes first
            sh = self.request[name]
            data = self.value(name)
            if tuple(data.shape) != tuple(sh.data.shape):
                raise CheckpointError(f"{name}: computed shape {list(data.shape)}, the model's "
                                      f"is {list(sh.data.shape)}")
            data = data.to(sh.data.dtype)
            self._last = (name, {(p.key, tuple(p.global_offset)): p.data for p in pieces(sh, data)})
        return self._last[1]

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            data = io.BytesIO()
            torch.save([self.objects[write_item.index.fqn]], data)
            return data
        slot = (write_item.index.fqn, tuple(write_item.index.offset))
        data = self._computed(self.origin[slot])[slot]
        return data.reshape(write_item.tensor_data.chunk.sizes).contiguous()


class _Writer(dcp.FileSystemWriter):
    """torch's file writer, its files cut at `file_bytes` in the plan's order (torch's own
    writer keeps each file's tensors until the file is complete, and sorts them by size)."""

    def __init__(self, path: str, file_bytes: int):
        # no copy-ahead: on a CUDA machine torch's overlapping loader would sort by size
        super().__init__(path, single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)
        self.file_bytes = file_bytes

    def write_data(self, plan: SavePlan, planner: SavePlanner):
        files: queue.Queue = queue.Queue()
        for i, bucket in enumerate(_buckets(plan.items, self.file_bytes)):
            name = f"{plan.storage_data.prefix}{i}.distcp"
            files.put((self.fs.concat_path(self.path, name), name, bucket))
        return self._write_data(planner, files)


def _nbytes(item: WriteItem) -> int:
    if item.tensor_data is None:  # an object: a few bytes
        return 0
    return item.tensor_data.chunk.sizes.numel() * item.tensor_data.properties.dtype.itemsize


def _buckets(items: list[WriteItem], file_bytes: int) -> list[list[WriteItem]]:
    """Consecutive items, at most `file_bytes` each (a larger item alone)."""
    out, size = [[]], 0
    for item in items:
        if out[-1] and size + _nbytes(item) > file_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += _nbytes(item)
    return out


def save_streamed(path: str | Path, request: dict, value: Callable[[str], torch.Tensor],
                  file_bytes: int = FILE_BYTES) -> None:
    """Write the model checkpoint of `request` ({name: ShardedTensor or factory}, from a model's
    `sharded_state_dict()`, on the meta device) into the empty directory `path`, asking
    `value(name)` for each tensor, in `request`'s order, once (its objects are written as they
    are). One process."""
    if not request:
        raise CheckpointError("nothing to write")
    for name, sh in request.items():
        if not isinstance(sh, (ShardedTensor, ShardedTensorFactory, ShardedObject)):
            raise CheckpointError(f"{name}: a {type(sh).__name__}, not a sharded tensor or object")
    planner = _Planner(request, value)
    try:
        dcp.save({}, storage_writer=_Writer(str(path), file_bytes), planner=planner, no_dist=True)
    except dcp.CheckpointException as e:
        raise dcp_causes(e)[0] from None  # a KeyboardInterrupt stays one
    torch.save({}, Path(path) / "common.pt")  # what megatron keeps beside the tensors: nothing
    save_config(CheckpointingConfig("torch_dist"), str(path))
