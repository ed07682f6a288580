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


def keep_records_up_to(path: Path, step: int) -> int:
    """Drop the records of `path` (metrics.jsonl) after `step`, the step a run restarts from: a run
    killed after its last checkpoint logged steps it will log again. Also drops a line cut short
    by the kill. Returns how many lines were dropped; the file is replaced atomically."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [x for x in lines if (s := _step_of(x)) is not None and s <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    """The step of a complete metrics.jsonl line, None for a line cut short or not a record."""
    try:
        step = json.loads(line).get("step") if line.endswith("\n") else None
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class MetricsLogger:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard. A run that
    restarts at `start_step` first drops what an earlier attempt logged after it (metrics.jsonl
    and TensorBoard events), so every step is in the logs once."""

    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool = True,
                 start_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total_steps = total_steps
        self.dropped = keep_records_up_to(self.path, start_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1)
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
                    self.writer.add_scalar(k if k.startswith("eval/") else f"train/{k}", v, step)
            self.writer.flush()
        done = step - self.first_step
        eta = (time.time() - self.start) / max(done, 1) * (self.total_steps - step)
        held = f" | eval loss {record['eval/loss']:.4f}" if "eval/loss" in record else ""
        print(f"step {step}/{self.total_steps} | loss {record['loss']:.4f}{held} | "
              f"lr {record['lr']:.2e} | grad {record['grad_norm']:.3f} | "
              f"{record['tokens_per_s']:.0f} tok/s | ETA {format_duration(eta)}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.writer is not None:
            self.writer.close()
