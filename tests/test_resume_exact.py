"""Exact resume and resharding through the command line.

Exact: 2N steps uninterrupted versus N steps, a kill -9 of the whole process group after the
checkpoint at N, and a restart: steps N+1..2N log bitwise-identical losses (one process, TP2, PP2,
DP2). Resharding: a checkpoint saved at TP2xPP2 (4 ranks) resumed at 1 rank and at TP2: the first
resumed loss equals the one the original layout computed for that step."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
N = 4
MODEL = ["decoder.num_layers=4", "data.seq_length=256", "data.micro_batch_size=2",
         "train.global_batch_size=4", "logging.every=1", "train.warmup_steps=2"]


def command(world: int, run: Path, data: Path, sets: list[str], *extra) -> list[str]:
    launch = [sys.executable, "-m", "mmpretrain"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(world), "-m", "mmpretrain"]
    args = ["train", "jobs/tiny-d.yaml", "--run-dir", str(run)]
    for s in [f"data.path={data}", *MODEL, *sets]:
        args += ["--set", s]
    return launch + args + list(extra)


def run(cmd) -> str:
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stderr


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before a kill and after the restart) keeps the last."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts its workers in
    sessions of their own, so its process group alone would leave them running)."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)


def kill_after_checkpoint(cmd, run_dir: Path, step: int) -> None:
    """Start `cmd`; SIGKILL all its processes as soon as `latest` names `step`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer, deadline = run_dir / "checkpoints" / "latest", time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and pointer.read_text().strip() == f"step_{step:08d}":
            kill_tree(proc.pid)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"


@pytest.mark.parametrize("world, sets", [
    (1, []),
    (2, ["parallel.tp=2"]),
    (2, ["parallel.pp=2"]),
    (2, []),  # DP2
], ids=["single", "tp2", "pp2", "dp2"])
def test_kill_and_restart_gives_bitwise_identical_losses(tmp_path, small_dataset, world, sets):
    sets = [*sets, f"train.steps={2 * N}", f"checkpoint.every={N}"]
    run(command(world, tmp_path / "a", small_dataset, sets))
    b = tmp_path / "b"
    kill_after_checkpoint(command(world, b, small_dataset, sets), b, N)
    err = run(command(world, b, small_dataset, sets))
    assert f"resumed from {b}/checkpoints/step_{N:08d}" in err
    want, got = losses(tmp_path / "a"), losses(b)
    assert [got[s] for s in range(N + 1, 2 * N + 1)] == [want[s] for s in range(N + 1, 2 * N + 1)]


def test_checkpoint_from_tp2_pp2_resumes_at_other_layouts(tmp_path, small_dataset):
    sets = ["train.steps=3", "checkpoint.every=2", "checkpoint.keep=5"]
    run(command(4, tmp_path / "orig", small_dataset, ["parallel.tp=2", "parallel.pp=2", *sets]))
    want = losses(tmp_path / "orig")[3]
    ckpt = tmp_path / "orig" / "checkpoints" / "step_00000002"
    for world, layout in ((1, []), (2, ["parallel.tp=2"])):
        out = tmp_path / f"resumed{world}"
        err = run(command(world, out, small_dataset, [*layout, *sets], "--resume", str(ckpt)))
        assert "under another layout" in err
        got = losses(out)
        assert list(got) == [3]
        assert abs(got[3] - want) <= 1e-5 * abs(want), (got[3], want)
