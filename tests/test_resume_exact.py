"""Exact resume and resharding through the command line.

Exact: 2N steps uninterrupted versus N steps, a kill -9 of the whole process group after the
checkpoint at N, and a restart: steps N+1..2N log bitwise-identical losses (one process, TP2, PP2,
DP2). Resharding: a checkpoint saved at TP2xPP2 (4 ranks) resumed at 1 rank, at TP2 and at DP2, and
the DP2 run's checkpoint resumed at 1 rank: the first resumed loss equals the one the original
layout computed for that step (the global batch of a step does not depend on the layout). Asynchronous saving
(`checkpoint.async_save`) writes the same checkpoint as a synchronous save and does not change
training."""
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
    """step -> loss."""
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
    (2, ["parallel.pp=2", "model.design=x", "model.cross_attention_every=2",
         "model.cross_attention_gate_lr_mult=20", "data.max_patches=256"]),
    (2, ["parallel.distributed_optimizer=true"]),
], ids=["single", "tp2", "pp2", "dp2", "x_pp2_gate_lr", "dp2_distopt"])
def test_kill_and_restart_gives_bitwise_identical_losses(tmp_path, small_dataset, world, sets):
    sets = [*sets, f"train.steps={2 * N}", f"checkpoint.every={N}"]
    run(command(world, tmp_path / "a", small_dataset, sets))
    b = tmp_path / "b"
    kill_after_checkpoint(command(world, b, small_dataset, sets), b, N)
    err = run(command(world, b, small_dataset, sets))
    assert f"resumed from {b}/checkpoints/step_{N:08d}" in err
    want, got = losses(tmp_path / "a"), losses(b)
    logged = [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 2 * N + 1))  # once each, whenever the kill came
    assert [got[s] for s in range(N + 1, 2 * N + 1)] == [want[s] for s in range(N + 1, 2 * N + 1)]


def test_checkpoint_from_tp2_pp2_resumes_at_other_layouts(tmp_path, small_dataset):
    # a constant lr after the warmup: the runs stop at other train.steps, and the cosine's length
    # follows train.steps
    sets = ["checkpoint.every=2", "checkpoint.keep=5", "train.min_lr=2e-3"]
    orig = tmp_path / "orig"
    run(command(4, orig, small_dataset, ["parallel.tp=2", "parallel.pp=2", "train.steps=4", *sets]))
    want = losses(orig)

    def resume(world: int, layout: list[str], out: Path, ckpt: Path, step: int) -> None:
        err = run(command(world, out, small_dataset, [*layout, f"train.steps={step}", *sets],
                          "--resume", str(ckpt)))
        assert "under another layout" in err
        got = losses(out)
        assert list(got) == [step]
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (out.name, got[step], want[step])

    ckpt = orig / "checkpoints" / "step_00000002"
    for world, layout, name in ((1, [], "one"), (2, ["parallel.tp=2"], "tp2"), (2, [], "dp2")):
        resume(world, layout, tmp_path / name, ckpt, 3)
    # the DP2 run's own checkpoint (each rank saved the state of its micro-batch slot) at 1 rank
    resume(1, [], tmp_path / "dp2-one", tmp_path / "dp2" / "checkpoints" / "step_00000003", 4)

def test_distributed_optimizer_checkpoints_reshard_as_their_format_allows(tmp_path, small_dataset):
    """A DP2 distributed-optimizer checkpoint (dp_reshardable) resumes at one rank and at DP2
    (the resumed losses are the original run's, the second after an update from the loaded
    state); at TP2 it is one clear error, as is resuming it without the distributed optimizer.
    Those two resumed runs save as fully_reshardable, at one rank and at DP2, and their
    checkpoints resume at PP2 with two virtual stages each and at TP2."""
    sets = ["checkpoint.every=2", "train.min_lr=2e-3", "parallel.distributed_optimizer=true"]
    orig = tmp_path / "orig"
    run(command(2, orig, small_dataset, [*sets, "train.steps=6", "checkpoint.keep=0"]))
    want, ckpt = losses(orig), orig / "checkpoints" / "step_00000002"

    def resume(world: int, changed: list[str], out: Path, ckpt: Path, steps: list[int]) -> Path:
        run(command(world, out, small_dataset, [*sets, *changed, f"train.steps={steps[-1]}"],
                    "--resume", str(ckpt)))
        got = losses(out)  # the second step follows an update from the loaded state
        assert list(got) == steps, got
        for step in steps:
            assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (out.name, got, want)
        return out / "checkpoints" / f"step_{steps[-1]:08d}"

    full = ["checkpoint.optimizer_format=fully_reshardable"]
    saved = {world: resume(world, full, tmp_path / f"full{world}", ckpt, [3, 4]) for world in (1, 2)}
    state = json.loads((saved[2] / "state.json").read_text())
    assert state["optimizer"] == {"distrib_optim_sharding_type": "fully_reshardable"}
    assert state["layout"][-1] == 2  # saved at dp 2
    for world, changed, message in (
            (2, ["parallel.tp=2"], "saved at tp=1 pp=1 vpp=1 and resumes only there (any dp)"),
            (1, ["parallel.distributed_optimizer=false"], "resume with parallel.distributed_optimizer=true")):
        r = subprocess.run(command(world, tmp_path / "refused", small_dataset,
                                   [*sets, *changed, "train.steps=3"], "--resume", str(ckpt)),
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode != 0 and message in r.stderr, r.stderr[-3000:]  # torchrun: 1
    resume(2, ["parallel.pp=2", "parallel.vpp=2"], tmp_path / "vpp2", saved[1], [5, 6])
    resume(2, ["parallel.tp=2"], tmp_path / "tp2", saved[2], [5, 6])


def test_data_metrics_count_every_data_parallel_rank(tmp_path, small_dataset):
    """Each rank reads only its slots' samples: the logged skip/truncation counts and packing
    efficiency are the whole global batch's, the same as one process logs."""
    sets = ["data.seq_length=128", "train.steps=2"]  # short rows: some samples are truncated
    logged = {}
    for world in (1, 2):
        run(command(world, tmp_path / f"w{world}", small_dataset, sets))
        lines = (tmp_path / f"w{world}" / "metrics.jsonl").read_text().splitlines()
        logged[world] = [{k: v for k, v in json.loads(x).items() if k.startswith("data/")}
                         for x in lines]
    assert all(rec["data/truncated"] > 0 for rec in logged[1])
    for one, two in zip(logged[1], logged[2], strict=True):
        assert one.keys() == two.keys()
        assert all(two[k] == pytest.approx(one[k], rel=1e-12) for k in one), (one, two)


def checkpoint_contents(path: Path, out: Path) -> dict:
    """Everything a checkpoint directory holds: its tensors (read without a process group), the
    common state, and the small files (state, loader positions, RNG states, config)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, out)
    contents = {"tensors": torch.load(out, weights_only=False),
                "common": torch.load(path / "common.pt", weights_only=False)}
    for f in sorted(path.rglob("*")):
        if f.suffix in (".json", ".yaml"):
            contents[f.relative_to(path).as_posix()] = f.read_text()
        elif f.parent.name == "rng":
            contents[f"rng/{f.name}"] = torch.load(f, weights_only=False)
    return contents


def equal(a, b) -> bool:
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("world", [1, 2], ids=["single", "dp2"])
def test_async_save_equals_a_synchronous_one(tmp_path, small_dataset, world):
    sets = [f"train.steps={2 * N}", f"checkpoint.every={N}"]
    run(command(world, tmp_path / "sync", small_dataset, sets))
    err = run(command(world, tmp_path / "async", small_dataset, [*sets, "checkpoint.async_save=true"]))
    assert "written in the background and published" in err
    want = losses(tmp_path / "sync")
    assert losses(tmp_path / "async") == want  # background writes do not disturb training
    for step in (N, 2 * N):
        name = f"step_{step:08d}"
        a, b = (checkpoint_contents(tmp_path / r / "checkpoints" / name, tmp_path / f"{r}{step}.pt")
                for r in ("sync", "async"))
        assert a.keys() == b.keys() and len(a["tensors"]) > 50
        b["config.yaml"] = b["config.yaml"].replace("async_save: true", "async_save: false")
        assert [k for k in a if not equal(a[k], b[k])] == [], name
    resumed = tmp_path / "resumed"
    run(command(world, resumed, small_dataset, sets, "--resume",
                str(tmp_path / "async" / "checkpoints" / f"step_{N:08d}")))
    got = losses(resumed)
    assert [got[s] for s in range(N + 1, 2 * N + 1)] == [want[s] for s in range(N + 1, 2 * N + 1)]


def test_pipeline_stages_start_from_different_weights(tmp_path, small_dataset):
    """Each pipeline stage draws its layers' initial weights from its own stream: no decoder
    layer starts as a copy of a layer on another stage (lr 0 keeps the initial weights). The
    uneven run evaluates in one process."""
    import torch

    run(command(3, tmp_path / "run", small_dataset, [  # stages 2 and 3 hold no vision encoder
        "parallel.pp=3", "decoder.num_layers=7", "parallel.first_stage_decoder_layers=1",
        "train.steps=1", "train.lr=0", "train.min_lr=0"]))
    tensors = checkpoint_contents(tmp_path / "run" / "checkpoints" / "step_00000001",
                                  tmp_path / "t.pt")["tensors"]
    qkv = tensors["language_model.block.layers.self_attention.linear_qkv.weight"]  # [layers, ...]
    assert len(qkv) == 7
    assert not any(torch.equal(qkv[i], qkv[j]) for i in range(7) for j in range(i + 1, 7))
    out = subprocess.run([sys.executable, "-m", "mmpretrain", "eval", "--run", str(tmp_path / "run"),
                          "--samples", "8"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1])["loss"] > 0
