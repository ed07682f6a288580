"""Two-stage training: stage 2 starts from the model weights of stage 1 (`checkpoint.init_from`,
`--init-from`) under another layout, with a fresh optimizer, schedule, step and data position; a
second start of stage 2 (a requeue) resumes its own checkpoint instead.

Stage 1 is NVLM-X alignment (only the cross-attention layers and the projector train, one
process); stage 2 trains the decoder too, at TP2 (torchrun), from another seed and with lr 0 so
that its saved weights are exactly the ones it started from."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpretrain.checkpoint import CheckpointError
from mmpretrain.train.resume import Start, start_point

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
SMALL = ["data.seq_length=128", "data.image_token_budget=16", "data.micro_batch_size=2",
         "train.global_batch_size=4", "logging.every=1", "train.warmup_steps=2"]
STAGE1 = ["train.steps=3", "model.train_only_cross_attention=true"]
# Stage 2 at lr 0 with the gates at the base lr: its weights stay stage 1's, so the saved tensors
# can be compared exactly (a gate lr multiplier resumes too: tests/test_resume_exact.py).
STAGE2 = ["train.seed=99", "train.lr=0", "train.min_lr=0", "vision.freeze=true",
          "model.cross_attention_gate_lr_mult=1"]


def command(world: int, run: Path, data: Path, sets: list[str], *extra) -> list[str]:
    launch = [sys.executable, "-m", "mmpretrain"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(world), "-m", "mmpretrain"]
    args = ["train", "jobs/tiny-x.yaml", "--run-dir", str(run)]
    for s in [f"data.path={data}", *SMALL, *sets]:
        args += ["--set", s]
    return launch + args + [str(e) for e in extra]


def run(cmd, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint, whole (any layout it was saved under)."""
    from megatron.core import dist_checkpointing

    tensors = dist_checkpointing.load_plain_tensors(str(ckpt))
    return {k: v for k, v in tensors.items() if not k.startswith("optimizer")}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, small_dataset) -> Path:
    """A finished 3-step NVLM-X alignment run (one process)."""
    out = tmp_path_factory.mktemp("stage1") / "align"
    run(command(1, out, small_dataset, STAGE1))
    return out


def test_stage2_starts_from_stage1_weights_under_tp2_and_a_requeue_resumes_its_own(
        megatron_world, stage1, small_dataset, tmp_path):
    run2 = tmp_path / "pretrain"
    final1 = stage1 / "checkpoints" / "step_00000003"
    # the config names a path that does not exist; --init-from overrides it
    r = run(command(2, run2, small_dataset, [*STAGE2, "parallel.tp=2", "train.steps=2",
                                              "checkpoint.init_from=/nonexistent"],
                    "--init-from", stage1))
    assert f"initialised the model weights from {final1}" in r.stderr
    assert "resumed from" not in r.stderr
    resolved = (run2 / "config.yaml").read_text()
    assert f"init_from: {stage1}" in resolved

    # weights: everything stage 1 ended with (its trained cross-attention layers and projector,
    # its frozen decoder and encoder), not stage 2's own seed-99 initialisation
    want, got = model_tensors(final1), model_tensors(run2 / "checkpoints" / "step_00000002")
    assert sorted(got) == sorted(want)
    assert any("cross_attention" in k for k in got)
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, differ

    # step, schedule and data position start fresh: steps 1, 2; the schedule has made 2 steps;
    # the same samples as stage 1's first 2 steps (the data order starts over)
    assert [m["step"] for m in metrics(run2)] == [1, 2]
    meta = state(run2 / "checkpoints" / "step_00000002")
    assert meta["step"] == 2 and meta["scheduler"]["num_steps"] == 2
    assert meta["consumed_samples"] == metrics(stage1)[1]["samples_seen"]

    # requeue: the run has a checkpoint of its own now; it resumes from it, not from stage 1
    r = run(command(2, run2, small_dataset, [*STAGE2, "parallel.tp=2", "train.steps=3"],
                    "--init-from", stage1))
    assert f"resumed from {run2}/checkpoints/step_00000002" in r.stderr
    assert "initialised the model weights" not in r.stderr
    assert metrics(run2)[-1]["step"] == 3
    assert state(run2 / "checkpoints" / "step_00000003")["scheduler"]["num_steps"] == 3


def test_init_from_a_mismatching_model_names_the_tensor(stage1, small_dataset, tmp_path):
    r = run(command(1, tmp_path / "other", small_dataset,
                    [*STAGE2, "train.steps=1", "decoder.ffn_hidden_size=192",
                     f"checkpoint.init_from={stage1}"]), ok=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "mlp.linear_fc" in r.stderr and "the configured model has" in r.stderr
    assert "Traceback" not in r.stderr


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return ckpt


def test_where_a_run_starts(tmp_path):
    stage1 = _fake_checkpoint(tmp_path / "stage1", 7)
    new = tmp_path / "new"
    assert start_point(new, None, False, False, True) == Start(None)
    assert start_point(new, None, False, False, True, str(tmp_path / "stage1")) == Start(stage1, True)
    assert start_point(new, None, False, False, True, str(stage1)) == Start(stage1, True)
    own = _fake_checkpoint(new, 3)  # a requeued stage 2: its own checkpoint wins
    assert start_point(new, None, False, False, True, str(stage1)) == Start(own)
    assert start_point(new, str(stage1), False, False, True, "elsewhere") == Start(stage1)  # --resume
    # --no-resume --overwrite empties the run directory: init_from applies again
    assert start_point(new, None, True, True, True, str(stage1)) == Start(stage1, True)
    with pytest.raises(CheckpointError, match="checkpoint.init_from .*nothing: neither a checkpoint"):
        start_point(tmp_path / "fresh", None, False, False, True, str(tmp_path / "nothing"))


def test_an_x_model_starts_from_a_d_run_with_fresh_cross_attention(megatron_world, small_dataset,
                                                                  tmp_path):
    """NVLM-X from a D run: every tensor D has is loaded, the cross-attention layers D lacks keep
    their initialisation (and are named); at lr 0 the saved X weights show both."""
    d_run = tmp_path / "d"
    d_cmd = command(1, d_run, small_dataset, ["train.steps=2"])
    d_cmd[d_cmd.index("jobs/tiny-x.yaml")] = "jobs/tiny-d.yaml"
    run(d_cmd)
    r = run(command(1, tmp_path / "x", small_dataset, [*STAGE2, "train.steps=1",
                                                       f"checkpoint.init_from={d_run}"]))
    assert "has no cross_attention_" in r.stderr and "fresh initialisation" in r.stderr
    d = model_tensors(d_run / "checkpoints" / "step_00000002")
    x = model_tensors(tmp_path / "x" / "checkpoints" / "step_00000001")
    cross = [k for k in x if "cross_attention_" in k]
    assert cross and not any("cross_attention_" in k for k in d)
    assert set(x) - set(cross) == set(d)
    for k in d:
        assert torch.equal(x[k], d[k]), k
    back = command(1, tmp_path / "d2", small_dataset, [*STAGE2, "train.steps=1",
                                                       f"checkpoint.init_from={tmp_path / 'x'}"])
    back[back.index("jobs/tiny-x.yaml")] = "jobs/tiny-d.yaml"
    r = run(back)  # and back: D from the X run names the cross-attention layers it leaves out
    assert "the model has no cross_attention_" in r.stderr and "are left out" in r.stderr
