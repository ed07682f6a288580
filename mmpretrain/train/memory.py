"""Peak GPU memory for the metrics records: the most any rank's allocator held since the previous
record, in GiB (`memory/peak_allocated_gib`: tensors; `memory/peak_reserved_gib`: the allocator's
cache as well, what an out-of-memory error counts). Nothing on CPU."""
from __future__ import annotations

import torch
import torch.distributed as dist

GIB = 2 ** 30


def memory_metrics() -> dict[str, float]:
    """A collective on GPU (every rank calls it at the same steps); {} without CUDA."""
    if not torch.cuda.is_available():
        return {}
    peaks = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()],
                         dtype=torch.float64, device="cuda")
    if dist.is_initialized():
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    torch.cuda.reset_peak_memory_stats()
    allocated, reserved = (peaks / GIB).tolist()
    return {"memory/peak_allocated_gib": allocated, "memory/peak_reserved_gib": reserved}
