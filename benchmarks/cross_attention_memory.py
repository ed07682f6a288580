"""Memory of the X/H cross-attention core (`attend_or_zero`) per layer, for torch's math kernel
against its fused one, at the shapes of the GPU benchmark's 1b batches. On CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cross_attention_memory.py --keys 3831,3136
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cross_attention_memory.py --keys 3831,3136 --dtype fp32

Why: the layer attended in fp32 with a boolean mask and `enable_gqa` (grouped key/value heads). On
CUDA, torch's memory-efficient kernel takes fp32 and masks but not `enable_gqa`, flash attention
takes neither fp32 nor masks, so that call fell back to the math kernel, which keeps the [b, a, s,
kr] fp32 probabilities for the backward (pytorch/pytorch#181528 lists the same fallback). The
layer now repeats key/value heads itself and attends in the activation dtype (--dtype bf16, the
default; --dtype fp32 is the earlier call). This script measures, for the math kernel (forced) and
for the CPU's fused kernel (flash attention, which keeps what the memory-efficient one keeps: q,
k, v, output, log-sum-exp), what autograd keeps (saved-tensor hooks, each storage once) and the
peak of a forward and backward above the inputs (torch.profiler's allocator trace). Shapes: one
row of --seq text queries, --heads query heads in --groups key/value groups of --head-dim, and kr
keys (the 1b batches of `gpu_step.py`: X 3831, H 3136 image tokens in the largest row).
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from mmpretrain.model.cross_attention import attend_or_zero

MiB = 2 ** 20
KERNELS = {"math": [SDPBackend.MATH], "fused": [SDPBackend.FLASH_ATTENTION]}


def inputs(b: int, a: int, g: int, d: int, s: int, kr: int):
    """bf16 q [b, a, s, d], k/v [b, g, kr, d] needing grads; a mask where the first 300 queries see
    nothing, the next ones the first image, the last half both."""
    q = torch.randn(b, a, s, d, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, g, kr, d, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, g, kr, d, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(b, 1, s, kr, dtype=torch.bool)
    mask[:, :, 300:, : kr // 2] = False
    mask[:, :, s // 2:, kr // 2:] = False
    return q, k, v, mask


def measure(kernel: str, shapes: tuple, dtype: torch.dtype) -> tuple[int, int]:
    """Forward and backward of the layer's core, called in `dtype` on the bf16 activations:
    (bytes autograd keeps, peak bytes allocated, inputs included)."""
    q, k, v, mask = inputs(*shapes)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with sdpa_kernel(KERNELS[kernel]):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = attend_or_zero(q.to(dtype), k.to(dtype), v.to(dtype), mask).to(q.dtype)
            out.float().sum().backward()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    peak = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
    return sum(kept.values()), peak


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", default="3831,3136", help="comma list of kr (keys per row)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=6, help="cross-attention layers of the model")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="what the core attends in: bf16 (the layer now), fp32 (the layer before)")
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    for kr in (int(x) for x in args.keys.split(",")):
        shapes = (1, args.heads, args.groups, args.head_dim, args.seq, kr)
        figures = {k: measure(k, shapes, dtype) for k in KERNELS}
        kept = {k: figures[k][0] for k in KERNELS}
        extra = {k: figures[k][1] - kept[k] for k in KERNELS}  # transient beyond what is kept
        for k in KERNELS:
            print(f"kr {kr}: {k:5s} kernel keeps {kept[k] / MiB:8.2f} MiB per layer, "
                  f"peak {(kept[k] + extra[k]) / MiB:8.2f} MiB")
        more = (kept["math"] - kept["fused"]) * args.layers + max(0, extra["math"] - extra["fused"])
        print(f"kr {kr}: the math kernel needs {more / 2 ** 30:.2f} GiB more over {args.layers} "
              f"layers (what they keep, plus the larger transient of one backward)")


if __name__ == "__main__":
    main()
