"""`logging.profile_steps`: the steps asked for, and only those, are in each rank's trace."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmpretrain.config import ConfigError, load

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_profiled_steps_are_traced_per_rank(tmp_path, small_dataset):
    run = tmp_path / "run"
    sets = [f"data.path={small_dataset}", "train.steps=3", "logging.profile_steps=[2,3]",
            "train.eval_every=0", "data.seq_length=128", "data.image_token_budget=16",
            "train.global_batch_size=4", "data.micro_batch_size=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mmpretrain", "train", "jobs/tiny-d.yaml", "--run-dir", str(run)]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "profiled steps 2-3" in r.stderr and "Self CPU" in r.stderr  # the top-ops table
    for rank in (0, 1):
        with gzip.open(run / "profile" / f"rank{rank}_steps2-3.json.gz", "rt") as f:
            names = {e.get("name") for e in json.load(f)["traceEvents"]}
        assert {"step 2", "step 3"} <= names and "step 1" not in names
        assert any(n and n.startswith("aten::") for n in names)  # the ops inside


@pytest.mark.parametrize("steps", ["[3]", "[0,2]", "[4,2]", "[1,2,3]", "[5,25]"])
def test_profile_steps_are_checked(steps):
    with pytest.raises(ConfigError, match="logging.profile_steps"):
        load(None, [f"logging.profile_steps={steps}"])
