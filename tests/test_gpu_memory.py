"""Peak GPU memory in the metrics records (a GPU only; skipped elsewhere, with the reason)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="peak GPU memory is measured and logged on a GPU only")


def test_records_carry_the_peak_gpu_memory(tmp_path, small_dataset):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmpretrain", "train", "jobs/tiny-d.yaml", "--run-dir", str(run)]
    for s in (f"data.path={small_dataset}", "train.steps=3", "logging.every=1",
              "train.eval_every=0"):
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records] == [1, 2, 3]
    for x in records:
        assert 0 < x["memory/peak_allocated_gib"] <= x["memory/peak_reserved_gib"] <= total
