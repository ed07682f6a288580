"""Where a training step's time goes (`gpu_step.py --profile N`): N more steps under
torch.profiler after the timed ones. Per step: wall time, host time (the ops' own CPU time:
Python, dispatch, kernel launches), device time (the kernels'), and the ops that take most of each.
A step whose host time is near its wall time and well above its device time is bound by the host:
the GPU waits for launches. Then, on a GPU, N more steps count the host's waits for the GPU
(`.item()`, blocking copies, ...) by the Python line that made them: a wait inside every layer
keeps the host from running ahead of the GPU. The count is a lower bound: torch's sync debug mode
reaches Python as a warning only from ops called through torch's Python bindings (a C++
extension's own syncs, e.g. Transformer Engine's, go to stderr), and a C++ op's warning in the
backward pass is replayed when the backward ends, so it is counted at the line that called it.
"""
from __future__ import annotations

import os
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


_TORCH = os.path.dirname(torch.__file__) + os.sep  # torch's own frames are not call sites


def _short(path: str) -> str:
    """A source path from its package on: after site-packages/, else relative to the directory
    the benchmark runs in."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.relpath(path) if path.startswith(os.getcwd()) else path


def call_site(stack: list[traceback.FrameSummary], depth: int = 2) -> str:
    """The innermost `depth` frames of a stack outside torch and this module, innermost first."""
    frames = [f for f in reversed(stack) if not f.filename.startswith(_TORCH)
              and f.filename not in (__file__, warnings.__file__)]
    return " < ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in frames[:depth])


@contextmanager
def syncs_recorded(sites: Counter) -> Iterator[Counter]:
    """Count, by `call_site`, the synchronizing CUDA calls made inside the block (torch's sync
    debug mode warns at each; those warnings are counted, not shown; other warnings are shown as
    before). Nothing is counted on a CPU."""
    cuda, show = torch.cuda.is_available(), warnings.showwarning

    def record(message, *args, **kwargs) -> None:
        if "synchroniz" in str(message):
            sites[call_site(traceback.extract_stack()[:-1])] += 1
        else:
            show(message, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        mode = torch.cuda.get_sync_debug_mode() if cuda else 0
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(mode)


def sync_report(step: Callable[[int], float], first: int, steps: int, top: int = 6) -> str:
    """Host waits for the GPU per step, by the Python line that made them (CUDA only)."""
    if not torch.cuda.is_available():
        return "host syncs: not counted without a GPU"
    with syncs_recorded(Counter()) as sites:
        for i in range(first, first + steps):
            step(i)
    sync()
    total = sum(sites.values()) / steps
    where = "; ".join(f"{site} x{n / steps:g}" for site, n in sites.most_common(top))
    return f"host syncs per step (seen from Python): {total:g}" + \
        (f"; most from: {where}" if where else "")


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
    lines.append("  " + sync_report(step, first + steps, steps, top))
    return "\n".join(lines)
