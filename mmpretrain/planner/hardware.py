"""GPU figures the planner needs: memory, dense peak throughput, link bandwidths.

Peak figures are the vendors' dense (no sparsity) tensor-core numbers for the SXM parts:
H100 SXM and H200 SXM 989 TFLOP/s bf16, 1979 FP8 (NVIDIA H100/H200 datasheets); A100 SXM 312
bf16, no FP8 (A100 datasheet); B200 2250 bf16, 4500 FP8 (DGX B200 datasheet, per GPU). Memory is
the total the driver reports (nvidia-smi), in GiB. Bandwidths: NVLink per direction (450 GB/s
H100/H200, 300 A100, 900 B200) and one 400 Gb/s NIC per GPU (200 Gb/s on A100 systems), as in the
DGX reference designs.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1024 ** 3
FP8_GAIN = 1.3
"""Speed of FP8 linear layers over bf16 ones in training. The datasheets' 2x peak is not what
matmuls of these shapes plus the casts and amax bookkeeping reach; NVIDIA's published Megatron/NeMo
LLM results put the end-to-end FP8 gain at about 1.3-1.5x, so the planner takes the low end."""


@dataclass(frozen=True)
class GPU:
    """One accelerator kind."""

    name: str
    memory_gib: float
    bf16_tflops: float
    fp8_tflops: float | None
    nvlink_gbs: float
    """NVLink bandwidth per GPU and direction, GB/s."""
    network_gbs: float
    """Inter-node bandwidth per GPU (one NIC per GPU), GB/s."""

    @property
    def memory_bytes(self) -> float:
        """Total memory in bytes."""
        return self.memory_gib * GiB

    def peak_flops(self, fp8: bool) -> float:
        """Dense bf16 peak FLOP/s, times FP8_GAIN for FP8 matmuls."""
        if fp8 and self.fp8_tflops is None:
            raise ValueError(f"{self.name} has no FP8 tensor cores: set train.fp8 to null")
        return self.bf16_tflops * 1e12 * (FP8_GAIN if fp8 else 1.0)


GPUS: dict[str, GPU] = {
    "h100": GPU("h100", 79.6, 989.0, 1979.0, 450.0, 50.0),   # H100 SXM 80 GB
    "h200": GPU("h200", 140.4, 989.0, 1979.0, 450.0, 50.0),  # H200 SXM 141 GB
    "a100": GPU("a100", 80.0, 312.0, None, 300.0, 25.0),     # A100 SXM 80 GB
    "b200": GPU("b200", 179.0, 2250.0, 4500.0, 900.0, 50.0),  # B200 180 GB
}


def gpu(name: str) -> GPU:
    """The GPU called `name` (h100, h200, a100, b200)."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r} (known: {', '.join(GPUS)})") from None
