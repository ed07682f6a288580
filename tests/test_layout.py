"""The parallel layout is validated against the model before any process group exists."""
import pytest
import torch.distributed as dist
from mmpretrain.parallel.layout import ParallelLayout

from mmpretrain.config import ConfigError, load


def layout(world, *sets):
    return ParallelLayout.from_config(load(None, list(sets)), world)


def test_valid_layouts_and_derived_dp():
    assert layout(8, "parallel.tp=2", "parallel.pp=2", "train.global_batch_size=8",
                  "data.micro_batch_size=1", "decoder.num_layers=4").dp == 2
    l4 = layout(4, "parallel.pp=2", "parallel.vpp=2", "decoder.num_layers=4",
                "train.global_batch_size=4", "data.micro_batch_size=1")
    assert (l4.dp, l4.model_chunks) == (2, 2)
    assert layout(2, "parallel.pp=2", "decoder.num_layers=5",
                  "parallel.first_stage_decoder_layers=1").pp == 2


@pytest.mark.parametrize("world, sets, message", [
    (3, ["parallel.tp=2"], "world size 3 is not divisible by parallel.tp x parallel.pp"),
    (2, ["parallel.tp=2", "decoder.num_query_groups=1", "decoder.num_attention_heads=4"],
     "decoder.num_query_groups = 1 is not divisible by parallel.tp = 2"),
    (4, ["parallel.tp=4", "decoder.num_attention_heads=2", "decoder.num_query_groups=2",
         "decoder.hidden_size=64"], "decoder.num_attention_heads = 2 is not divisible"),
    (4, ["parallel.tp=4", "vision.num_attention_heads=2", "decoder.num_attention_heads=4",
         "decoder.num_query_groups=4"], "vision.num_attention_heads = 2 is not divisible"),
    (2, ["parallel.pp=2", "decoder.num_layers=3"],
     "decoder.num_layers = 3 is not divisible across 2 pipeline stages"),
    (2, ["parallel.pp=2", "parallel.vpp=2", "decoder.num_layers=2"],
     "x 2 virtual stages"),
    (2, ["parallel.pp=2", "decoder.num_layers=4", "parallel.first_stage_decoder_layers=5"],
     "parallel.first_stage_decoder_layers = 5"),
    (2, ["parallel.pp=2", "decoder.num_layers=4", "parallel.first_stage_decoder_layers=4"],
     "leaves 0 of decoder.num_layers = 4 for 1 stages"),
    (1, ["parallel.first_stage_decoder_layers=1"], "needs parallel.pp > 1"),
    (2, ["parallel.tp=2", "decoder.ffn_hidden_size=255"],
     "decoder.ffn_hidden_size = 255 is not divisible by parallel.tp = 2"),
    (2, ["parallel.tp=2", "vision.ffn_hidden_size=127"],
     "vision.ffn_hidden_size = 127 is not divisible by parallel.tp = 2"),
    (2, ["parallel.tp=2", "projector.hidden_size=33"], "projector.hidden_size"),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_length=255"],
     "data.seq_length = 255 is not divisible by parallel.tp = 2"),
    (1, ["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tp > 1"),
    (1, ["parallel.vpp=2"], "parallel.vpp"),
    (4, ["train.global_batch_size=6", "data.micro_batch_size=1"],
     "train.global_batch_size 6 is not divisible by data.micro_batch_size x data-parallel size"),
    (2, ["parallel.pp=2", "parallel.vpp=2", "decoder.num_layers=4", "train.global_batch_size=3",
         "data.micro_batch_size=1"], "micro-batches per step (3) divisible by parallel.pp"),
])
def test_each_violation_is_named_before_any_process_group(world, sets, message):
    assert not dist.is_initialized() or dist.get_world_size() == 1
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        layout(world, *sets)


def test_cli_reports_layout_errors_with_exit_2(tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "3"}
    r = subprocess.run([sys.executable, "-m", "mmpretrain", "train", "jobs/tiny-d.yaml",
                        "--run-dir", str(tmp_path / "r"), "--set", "parallel.tp=2"],
                       capture_output=True, text=True, env=env, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "world size 3 is not divisible" in r.stderr and "Traceback" not in r.stderr
