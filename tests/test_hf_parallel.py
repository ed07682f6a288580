"""Export reads a checkpoint saved under any layout: TP2 x PP2 exports the same tensors as the
one-process checkpoint it was resharded from."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_helpers import random_checkpoint, tiny_config, write_dataset_tokenizer
from safetensors import safe_open

from mmpretrain.hf.export import export
from mmpretrain.hf.verify import verify

HERE = Path(__file__).parent


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in directory.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.skipif(not hasattr(__import__("mmpretrain.model.build", fromlist=["x"]),
                                "build_model_chunks"), reason="pipeline parallelism not built")
def test_export_from_tp2_pp2_equals_export_from_tp1(tmp_path):
    from mmpretrain.parallel import init_distributed

    init_distributed(1, 1, None, seed=1234)
    tok = write_dataset_tokenizer(tmp_path / "data")
    cfg = tiny_config(tmp_path / "data")
    source = random_checkpoint(tmp_path / "tp1", cfg, tok)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(HERE / "hf_parallel_worker.py"), str(tmp_path / "tp1" / "config.yaml"), str(source),
           str(tmp_path / "tp2pp2")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    export(source, tmp_path / "hf_tp1")
    resharded = export(tmp_path / "tp2pp2", tmp_path / "hf_tp2pp2")
    assert resharded.name == "step_00000001"
    a, b = hf_tensors(tmp_path / "hf_tp1"), hf_tensors(tmp_path / "hf_tp2pp2")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert max(verify(resharded, tmp_path / "hf_tp2pp2", tol=1e-4).values()) < 1e-4
