"""Process-group start-up for megatron-core: gloo on CPU (with the CPU shim), NCCL on GPUs."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from . import cpu_shim

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
_INIT_COUNT = [0]  # process-group starts in this process; all ranks start and stop together


def launched_by_torchrun() -> bool:
    """Whether torchrun (or an equivalent launcher) set the rendezvous environment."""
    return all(key in os.environ for key in _TORCHRUN_ENV)


def _init_process_group(timeout_s: int) -> None:
    """Start `torch.distributed`: gloo on CPU, NCCL on GPUs; a world of one without torchrun."""
    timeout = datetime.timedelta(seconds=timeout_s)
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if launched_by_torchrun():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        # torch names the default group the same on every init, so a re-init on the launcher's
        # store would read the previous group's gloo/NCCL addresses: give each init its own prefix.
        _INIT_COUNT[0] += 1
        store = dist.PrefixStore(f"mmpretrain_init_{_INIT_COUNT[0]}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        return
    if use_cuda:
        torch.cuda.set_device(0)
    # An in-memory store: no network port, so concurrent single-process runs cannot collide.
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def _current_layout() -> tuple[int, int, int | None]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size(),
    )


def seed_everything(seed: int) -> None:
    """Seed python and numpy the same on every rank; torch and megatron's RNG tracker (its
    tensor-parallel stream is `seed + 2718 + tp_rank`) with `seed + 100 * pp_rank`, as
    Megatron-LM does: each pipeline stage draws its layers' initial weights from a stream of its
    own (with one seed, every stage after the first would start as a copy of the others), while
    tensor- and data-parallel ranks share theirs (identical replicas and master weights)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed % 2**32)
    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def init_distributed(
    tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234, timeout_s: int = 600
) -> None:
    """Initialise `torch.distributed` and megatron's model-parallel state, then seed.

    Under torchrun the world comes from the environment; otherwise it is a world of one.
    On CPU the megatron-core CPU shim is installed first. Calling it again with the same layout
    only re-seeds; with another layout it raises (call `destroy_distributed()` first).
    """
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        layout = _current_layout()
        if layout != (tp, pp, vpp):
            raise RuntimeError(
                f"megatron-core is already initialised with (tp, pp, vpp)={layout}; "
                f"asked for {(tp, pp, vpp)}. Call destroy_distributed() first."
            )
        seed_everything(seed)
        return
    if not torch.cuda.is_available():
        cpu_shim.install()
    if not dist.is_initialized():
        _init_process_group(timeout_s)
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise RuntimeError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    seed_everything(seed)


def destroy_distributed() -> None:
    """Tear down megatron's model-parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """Global rank (0 when `torch.distributed` is not initialised)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 when `torch.distributed` is not initialised)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    """Whether this is global rank 0."""
    return rank() == 0
