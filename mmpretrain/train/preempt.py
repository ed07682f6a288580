"""Preemption: SIGTERM or SIGUSR1 asks the run to save a checkpoint and exit, so that Slurm can
requeue it and the requeued job resumes from that checkpoint.

Slurm sends SIGUSR1 to the batch script ahead of the time limit (`--signal=B:USR1@<seconds>`,
which the sbatch template forwards to every task) and SIGTERM on preemption or `scancel`. The
handler only sets a flag; the training loop checks it after each optimizer step. Signals reach
ranks at different times, so the ranks agree with an all-reduce (MAX) of the flag before acting:
all of them save the same step together.
"""
from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from mmpretrain.stop_signals import STOP_SIGNALS

if TYPE_CHECKING:
    import torch

REQUEUE_EXIT_CODE = 75
"""Exit status of a run that saved a checkpoint because it was asked to stop: EX_TEMPFAIL of
sysexits.h ("temporary failure, try again"). The sbatch template requeues the job on it."""

STOPPED_FILE = "stopped.json"
"""Written to the run directory by rank 0 once the checkpoint of a requested stop is saved, before
the exit. srun returns 128 + 9 instead of 75 when `--kill-on-bad-exit` killed a peer that was still
tearing down; the sbatch template requeues on this file as on the exit status (and removes it
before each start)."""


class PreemptionHandler:
    """Installs handlers for SIGTERM and SIGUSR1 that record the signal; `uninstall` restores the
    previous handlers. Use in the main thread (Python delivers signals there). Import-light (no
    torch), so that `mmpretrain train` installs it before its slow imports."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        """Start catching the signals (again: no change)."""
        if self._previous:
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers found at `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def reason(self) -> str:
        """The signal this process received, or that another rank did."""
        return signal.Signals(self.received).name if self.received is not None else \
            "a signal to another rank"

    def stop_requested(self, device: torch.device | str = "cpu") -> bool:
        """Whether any rank has received a signal; a collective: every rank must call it."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
