"""Export reads a checkpoint saved under any layout: a D, X or H model re-saved under TP=2 x PP=2
(and a D model under TP=2 x DP=2 with the distributed optimizer) exports the same tensors as the
one-process checkpoint it came from, and verifies (Llava for D, the remote-code model for X and
H)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_helpers import design_config, hf_tensors, random_checkpoint, write_dataset_tokenizer

from mmpretrain.hf.export import export
from mmpretrain.hf.verify import verify

HERE = Path(__file__).parent
# X/H under pipeline parallelism size the image context sent between stages by data.max_patches.
LAYOUT = "parallel.tp=2,parallel.pp=2,data.max_patches=256"


@pytest.mark.parametrize("design,layout", [
    ("d", LAYOUT), ("x", LAYOUT), ("h", LAYOUT),
    ("d", "parallel.tp=2,parallel.pp=1,parallel.distributed_optimizer=true,train.global_batch_size=8")])
def test_export_from_a_parallel_layout_equals_export_from_tp1(tmp_path, design, layout):
    from mmpretrain.parallel import init_distributed

    init_distributed(1, 1, None, seed=1234)
    tok = write_dataset_tokenizer(tmp_path / "data")
    cfg = design_config(tmp_path / "data", design, tiles=design == "h")
    source = random_checkpoint(tmp_path / "tp1", cfg, tok)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(HERE / "hf_parallel_worker.py"), str(tmp_path / "tp1" / "config.yaml"), str(source),
           str(tmp_path / "parallel"), layout]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    if "distributed_optimizer" in layout:  # the optimizer's state is saved sharded over dp
        from torch.distributed.checkpoint import FileSystemReader

        saved = FileSystemReader(str(tmp_path / "parallel" / "checkpoints" / "step_00000001"))
        assert any(k.startswith("optimizer") for k in saved.read_metadata().state_dict_metadata)
    export(source, tmp_path / "hf_tp1")
    resharded = export(tmp_path / "parallel", tmp_path / "hf_parallel")
    assert resharded.name == "step_00000001"
    a, b = hf_tensors(tmp_path / "hf_tp1"), hf_tensors(tmp_path / "hf_parallel")
    assert a.keys() == b.keys()
    if design != "d":
        assert any(".cross_attn_attn_gate" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert max(verify(resharded, tmp_path / "hf_parallel", tol=1e-4).values()) < 1e-4
