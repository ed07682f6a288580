"""Run outputs on rank 0: metrics.jsonl, TensorBoard events under tb/, a console progress line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s'."""
    s = int(max(0, seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total_steps = total_steps
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
        self.start = time.time()
        self.first_step: int | None = None

    def log(self, record: dict) -> None:
        """Write `record` (must hold 'step') and print the progress line."""
        step = record["step"]
        if self.first_step is None:
            self.first_step, self.start = step - 1, time.time() - record.get("step_time", 0.0)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        done = step - self.first_step
        eta = (time.time() - self.start) / max(done, 1) * (self.total_steps - step)
        print(f"step {step}/{self.total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
              f"grad {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | "
              f"ETA {format_duration(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.writer is not None:
            self.writer.close()
