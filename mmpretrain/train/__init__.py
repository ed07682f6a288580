"""Training: the loop, one step, the optimizer, metrics, preemption and resume.

This module stays import-light (no torch) so the CLI can name its errors cheaply."""
from __future__ import annotations


class DivergedError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient (train.max_skipped_steps)."""
