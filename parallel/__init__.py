"""mmpretrain.parallel: megatron-core start-up and the CPU/gloo backend for megatron-core."""

from .cpu_shim import MEGATRON_VERSION, cuda_to_cpu, install
from .runtime import destroy_distributed, init_distributed, is_rank0, rank, world_size

__all__ = [
    "MEGATRON_VERSION",
    "cuda_to_cpu",
    "destroy_distributed",
    "init_distributed",
    "install",
    "is_rank0",
    "rank",
    "world_size",
]
