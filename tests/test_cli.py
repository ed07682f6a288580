"""The command line end to end: synth -> train -> eval, run directory contents, clean errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mmpretrain", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["train", "jobs/tiny-d.yaml", "--set", "train.stepz=3"], "train.stepz"),
    (["train", "jobs/tiny-d.yaml", "--set", "decoder.hidden_size=big"], "decoder.hidden_size"),
    (["train", "jobs/nope.yaml"], "jobs/nope.yaml"),
    (["train"], "config"),
    (["eval", "--run", "/nonexistent/run"], "/nonexistent/run"),
    (["frobnicate"], "frobnicate"),
    (["data", "build", "--input", "tests", "--out", "jobs"], "--out jobs: exists and is not an empty"),
])
def test_errors_exit_2_with_one_clear_line(args, needle):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_unusable_paths_and_flags_exit_2_with_one_clear_line(tmp_path, small_dataset):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    train = ["train", "jobs/tiny-d.yaml", "--set", f"data.path={small_dataset}"]
    for args, needle in [
        ([*train, "--run-dir", a_file], "is a file"),
        ([*train, "--run-dir", a_file / "run"], "Not a directory"),
        ([*train, "--run-dir", tmp_path / "run", "--overwrite"], "only with --no-resume"),
        (["eval", "--run", tmp_path, "--samples", "0"], "--samples: must be positive"),
        (["slurm", "render", "jobs/tiny-d.yaml", "--nodes", "1", "--gpus-per-node", "1", "-o",
          tmp_path], "Is a directory"),
    ]:
        r = cli(*args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
        assert needle in r.stderr.strip().splitlines()[-1].partition("mmpretrain: error: ")[2]


def test_train_without_dataset_names_the_path(tmp_path):
    r = cli("train", "jobs/tiny-d.yaml", "--run-dir", tmp_path / "run",
            "--set", f"data.path={tmp_path / 'missing'}")
    assert r.returncode == 2 and "data.path" in r.stderr and "Traceback" not in r.stderr


def test_synth_train_eval(tmp_path, small_dataset):
    run = tmp_path / "run"
    r = cli("train", "jobs/tiny-d.yaml", "--run-dir", run, "--set", f"data.path={small_dataset}",
            "--set", "train.steps=4", "--set", "logging.every=1", "--set", "checkpoint.every=2",
            "--set", "train.global_batch_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 4/4" in r.stderr and "ETA" in r.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_seen", "data/packing_efficiency"):
        assert all(key in rec for rec in records)
    assert records[-1]["samples_seen"] > records[0]["samples_seen"] > 0
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert not list(ckpts.glob(".tmp-*"))

    r = cli("eval", "--run", run, "--samples", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["loss"] > 0 and result["loss_shuffled_images"] > 0
    assert result["checkpoint"].endswith("step_00000004")
    r = cli("eval", "--run", ckpts / "step_00000002", "--samples", "16")  # a checkpoint: that step
    assert r.returncode == 0, r.stderr[-3000:]
    earlier = json.loads(r.stdout.strip().splitlines()[-1])
    assert earlier["checkpoint"] == str(ckpts / "step_00000002")
    assert earlier["samples"] == 16 and earlier["loss"] != result["loss"]

    cfg = yaml.safe_load((run / "config.yaml").read_text())  # every held-out sample too long
    cfg["data"].update(seq_length=16, long_samples="drop")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("eval", "--run", run, "--samples", "16")
    assert r.returncode == 2 and "have no text token to score (16 could not be used)" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_diverged_run_exits_1_with_its_last_finite_weights_saved(tmp_path, small_dataset):
    """An lr so large that the first update overflows the next forward: the following steps are
    skipped, train.max_skipped_steps of them stop the run with status 1 and one line naming the
    setting, and the stop's checkpoint is the run's latest."""
    run = tmp_path / "run"
    r = cli("train", "jobs/tiny-d.yaml", "--run-dir", run, "--set", f"data.path={small_dataset}",
            "--set", "train.lr=1e30", "--set", "train.warmup_steps=0", "--set", "train.steps=20",
            "--set", "train.max_skipped_steps=2", "--set", "checkpoint.every=0")
    assert r.returncode == 1, r.stderr
    assert "mmpretrain: training stopped: 2 steps in a row" in r.stderr
    assert "train.max_skipped_steps 2" in r.stderr and "Traceback" not in r.stderr
    saved = (run / "checkpoints" / "latest").read_text().strip()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert saved == f"step_{records[-1]['step']:08d}" and records[-1]["skipped_updates"] >= 1


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    import mmpretrain.cli as cli_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_plan", interrupted)
    assert cli_module.main(["plan", "jobs/tiny-d.yaml", "--nodes", "1"]) == 130
    assert capsys.readouterr().err == "mmpretrain: plan interrupted\n"
