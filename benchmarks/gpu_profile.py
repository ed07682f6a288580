"""Where a training step's time goes (`gpu_step.py --profile N`): N more steps under
torch.profiler after the timed ones. Per step: wall time, host time (the ops' own CPU time:
Python, dispatch, kernel launches), device time (the kernels'), and the ops that take most of each.
A step whose host time is near its wall time and well above its device time is bound by the host:
the GPU waits for launches.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def sync() -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _top(events: list, key: str, n: int, steps: int) -> str:
    rows = sorted(events, key=lambda e: -getattr(e, key))[:n]
    return "; ".join(f"{e.key[:48]} {getattr(e, key) / steps / 1e3:.1f}" for e in rows
                     if getattr(e, key) > 0)


def profile_steps(step: Callable[[int], float], first: int, steps: int, top: int = 6) -> str:
    """Run `step(first) .. step(first + steps - 1)` under the profiler; a few lines of summary."""
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(first, first + steps):
            step(i)
        sync()
        wall = (time.perf_counter() - t0) / steps * 1e3
    events = prof.key_averages()
    host_ops = [e for e in events if e.device_type == DeviceType.CPU]
    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    host = sum(e.self_cpu_time_total for e in host_ops) / steps / 1e3
    device = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    busy = (f"{device:.1f} ms device kernel time ({100 * device / wall:.0f}% of the step busy)"
            if kernels else "no device kernels (a CPU run)")
    lines = [f"profile: {wall:.1f} ms/step wall (under the profiler), {host:.1f} ms host op time, "
             f"{busy}", f"  host ms/step: {_top(host_ops, 'self_cpu_time_total', top, steps)}"]
    if kernels:
        lines.append(f"  device ms/step: {_top(kernels, 'self_device_time_total', top, steps)}")
    return "\n".join(lines)
