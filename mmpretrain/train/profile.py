"""`logging.profile_steps: [first, last]`: those training steps under torch.profiler. Each rank
writes a trace (chrome://tracing or https://ui.perfetto.dev) to
<run>/profile/rank<r>_steps<a>-<b>.json.gz (a..b: the steps this attempt profiled; a run stopped
inside the window and resumed writes a second file), each step a `step N` range in it; rank 0
logs the ops that took most time."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

log = logging.getLogger("mmpretrain")


class StepProfiler:
    """Call `begin(step)` before a step's work and `end(step)` after it, on every rank."""

    def __init__(self, steps: list[int], run_dir: Path, rank: int, total_steps: int):
        self.first, self.last = steps if steps else (0, -1)  # (0, -1): profile nothing
        self.dir, self.rank = Path(run_dir) / "profile", rank
        self.prof: profile | None = None
        self.region = None
        self.profiled: list[int] = []
        if steps and self.first > total_steps and rank == 0:
            log.warning("logging.profile_steps %s: the run ends at step %d, nothing is profiled",
                        steps, total_steps)

    def begin(self, step: int) -> None:
        if not self.first <= step <= self.last:
            return
        if self.prof is None:  # the first profiled step (or the first after a resume inside)
            cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            self.prof = profile(activities=[ProfilerActivity.CPU, *cuda], record_shapes=True)
            self.prof.__enter__()
        self.region = record_function(f"step {step}")
        self.region.__enter__()

    def end(self, step: int) -> None:
        if self.region is None:
            return
        self.region.__exit__(None, None, None)
        self.region = None
        self.profiled.append(step)
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run ends inside the profiled steps)."""
        if self.prof is None:
            return
        if self.region is not None:
            self.region.__exit__(None, None, None)
            self.region = None
        self.prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        a, b = (self.profiled[0], self.profiled[-1]) if self.profiled else (0, 0)
        self.prof.export_chrome_trace(str(self.dir / f"rank{self.rank}_steps{a}-{b}.json.gz"))
        if self.rank == 0:
            cuda = torch.cuda.is_available()
            table = self.prof.key_averages().table(
                sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15)
            log.info("profiled steps %d-%d; traces in %s; the ops of most %s time (totals over "
                     "those steps):\n%s", a, b, self.dir,
                     "GPU" if cuda else "CPU", table)
        self.prof = None
