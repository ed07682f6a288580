"""Checkpoint behaviour through the command line: resume choice, crashes during a save,
preemption, retention, and clear errors for damaged or mismatching checkpoints."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmpretrain.checkpoint.files import prune

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TINY = ["--set", "train.steps=4", "--set", "logging.every=1", "--set", "train.global_batch_size=4",
        "--set", "data.seq_length=128", "--set", "data.image_token_budget=16"]


def train_args(run, data, *extra):
    return ["train", "jobs/tiny-d.yaml", "--run-dir", str(run), "--set", f"data.path={data}",
            *TINY, *extra]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mmpretrain", *map(str, args)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_dataset):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    r = cli(*train_args(run, small_dataset, "--set", "checkpoint.every=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_rerun_resumes_and_no_resume_refuses(trained, small_dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    r = cli(*train_args(run, small_dataset, "--set", "train.steps=5"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and logged_steps(run) == [1, 2, 3, 4, 5]
    assert latest(run) == "step_00000005"
    r = cli(*train_args(run, small_dataset, "--set", "train.steps=5", "--resume",
                        run / "checkpoints" / "step_00000004"))  # step 5 again
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropped 1 record(s) after step 4" in r.stderr and logged_steps(run) == [1, 2, 3, 4, 5]
    r = cli(*train_args(run, small_dataset, "--no-resume"))
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = cli(*train_args(run, small_dataset, "--no-resume", "--overwrite", "--set", "train.steps=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert logged_steps(run) == [1] and latest(run) == "step_00000001"


def test_a_resumed_run_follows_the_configs_schedule(trained, small_dataset, tmp_path):
    """Extended and with a new learning rate on resume: the learning rates of the new steps are
    a fresh run's with that config (not the checkpoint's schedule)."""
    new = ["--set", "train.steps=6", "--set", "train.lr=1e-3", "--set", "train.min_lr=1e-5"]
    log, resumed, fresh = resumed_and_fresh(trained, small_dataset, tmp_path, new)
    assert "max_lr 0.002 -> 0.001" in log
    assert resumed[5] == fresh[5] and resumed[6] == fresh[6] == 1e-5


def test_a_run_switched_to_wsd_on_resume_decays_at_its_new_end(trained, small_dataset, tmp_path):
    """A cosine run resumed as warmup-stable-decay and extended: its new steps take a fresh wsd
    run's learning rates (held, then decayed over the last two), and the change is logged."""
    new = ["--set", "train.steps=8", "--set", "train.lr_decay=wsd",
           "--set", "train.wsd_decay_steps=2", "--set", "train.warmup_steps=1"]
    log, resumed, fresh = resumed_and_fresh(trained, small_dataset, tmp_path, new)
    assert "lr_decay_style cosine -> WSD" in log
    assert [resumed[s] for s in range(5, 9)] == [fresh[s] for s in range(5, 9)]
    assert resumed[5] == resumed[6] > resumed[7] > resumed[8] == fresh[8]


def resumed_and_fresh(trained: Path, data: Path, tmp_path: Path, new: list[str]):
    """A copy of `trained` resumed with the settings `new`, and a fresh run with them: (the
    resumed run's log, step -> lr of each)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    r = cli(*train_args(run, data, *new))
    assert r.returncode == 0, r.stderr[-3000:]
    f = cli(*train_args(tmp_path / "fresh", data, *new))
    assert f.returncode == 0, f.stderr[-3000:]
    return r.stderr, step_lrs(run), step_lrs(tmp_path / "fresh")


def step_lrs(run: Path) -> dict[int, float]:
    return {json.loads(x)["step"]: json.loads(x)["lr"] for x in
            (run / "metrics.jsonl").read_text().splitlines()}


def test_resume_from_a_named_checkpoint(trained, small_dataset, tmp_path):
    r = cli(*train_args(tmp_path / "other", small_dataset, "--resume",
                        trained / "checkpoints" / "step_00000002"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert logged_steps(tmp_path / "other") == [3, 4]
    assert "not this run's own latest" not in r.stderr
    r = cli(*train_args(tmp_path / "other", small_dataset, "--resume",  # as a requeue would
                        trained / "checkpoints" / "step_00000002"))
    assert r.returncode == 0 and "not this run's own latest checkpoint step_00000004" in r.stderr
    r = cli(*train_args(tmp_path / "x", small_dataset, "--resume", tmp_path / "nothing"))
    assert r.returncode == 2 and "neither a checkpoint nor a run" in r.stderr


@pytest.mark.parametrize("damage, message, commands", [
    (lambda c: (c / "__0_0.distcp").unlink(), "__0_0.distcp is missing", ("train", "eval")),
    (lambda c: os.truncate(c / "__0_1.distcp", 100), "__0_1.distcp is truncated", ("train", "eval")),
    (lambda c: (c / ".metadata").unlink(), ".metadata is missing", ("train", "eval")),
    (lambda c: os.truncate(c / "state.json", 5), "state.json cannot be read", ("train", "eval")),
    (lambda c: os.truncate(c / "common.pt", 5), "common.pt cannot be read", ("train", "eval")),
    (lambda c: os.truncate(c / "loader_dp0.json", 5), "loader_dp0.json cannot be read", ("train",)),
    (lambda c: (c / "rng" / "rank0.pt").unlink(), "rng/rank0.pt is missing", ("train",)),
])
def test_damaged_checkpoint_names_the_file(trained, small_dataset, tmp_path, damage, message,
                                           commands):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run / "checkpoints" / "step_00000004")
    every = {"train": train_args(run, small_dataset, "--set", "train.steps=6"),
             "eval": ["eval", "--run", run]}
    for command in commands:
        r = cli(*every[command])
        assert r.returncode == 2, r.stderr[-3000:]
        assert message in r.stderr and "Traceback" not in r.stderr
        if command == "train":  # the way forward: the previous checkpoint is complete
            older = run / "checkpoints" / "step_00000002"
            assert f"; {older} is complete: --resume {older} starts from it" in r.stderr


def test_mismatching_model_names_the_tensor(trained, small_dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    r = cli(*train_args(run, small_dataset, "--set", "train.steps=6",
                        "--set", "decoder.ffn_hidden_size=192"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "mlp.linear_fc" in r.stderr and "the configured model has" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli(*train_args(run, small_dataset, "--set", "train.steps=6",
                        "--set", "decoder.vocab_size=4000"))
    assert r.returncode == 2 and "word_embeddings.weight" in r.stderr, r.stderr[-3000:]
    assert "the vocabulary is padded to a multiple of lcm(128, parallel.tp)" in r.stderr


def test_latest_naming_a_missing_checkpoint_is_an_error(trained, small_dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    r = cli(*train_args(run, small_dataset, "--set", "train.steps=6"))
    assert r.returncode == 2 and "step_00000004, which is missing" in r.stderr


def test_retention_keeps_newest_and_every_mth_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 11):
        (root / f"step_{step:08d}").mkdir(parents=True)
    (root / "step_00000002.bak").mkdir()  # a user's copy: neither counted nor removed
    prune(root, keep=2, keep_every=4, protect="step_00000003")
    assert sorted(p.name for p in root.iterdir()) == [
        "step_00000002.bak", "step_00000003", "step_00000004", "step_00000008", "step_00000009",
        "step_00000010"]


def test_a_checkpoint_of_the_same_step_is_replaced_without_a_gap(tmp_path):
    """Saving a step that exists (a run resumed from an earlier checkpoint) moves the old one
    aside, publishes, then deletes it; a crash between the renames is repaired at the next start."""
    from mmpretrain.checkpoint.files import REPLACED, clear_stale_saves
    from mmpretrain.checkpoint.store import _publish

    root = tmp_path / "checkpoints"
    for name, text in [("step_00000004", "old"), (".tmp-step_00000004", "new")]:
        (root / name).mkdir(parents=True)
        (root / name / "state.json").write_text(text)
    _publish(root / ".tmp-step_00000004", root / "step_00000004")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004"]
    assert (root / "step_00000004" / "state.json").read_text() == "new"
    os.replace(root / "step_00000004", root / (REPLACED + "step_00000004"))  # the crash's state
    (root / ".tmp-step_00000006").mkdir()  # and a save that did not finish
    clear_stale_saves(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004"]
    assert (root / "step_00000004" / "state.json").read_text() == "new"


def test_kill_during_save_keeps_the_previous_checkpoint(small_dataset, tmp_path):
    run, ready = tmp_path / "run", tmp_path / "ready"
    args = train_args(run, small_dataset, "--set", "checkpoint.every=2")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_publish.py"), "4",
                             str(ready), *args], cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        assert not (run / "checkpoints" / "latest").exists() or latest(run) in ("step_00000002",)
        time.sleep(0.05)
    assert ready.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "timeout"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest(run) == "step_00000002"
    assert (run / "checkpoints" / ".tmp-step_00000004").is_dir()  # the interrupted save
    r = cli(*train_args(run, small_dataset, "--set", "checkpoint.every=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "did not finish" in r.stderr and "resumed from" in r.stderr
    assert latest(run) == "step_00000004" and not (run / "checkpoints" / ".tmp-step_00000004").exists()


def test_kill_during_async_save_keeps_latest_while_training_went_on(small_dataset, tmp_path):
    run, ready = tmp_path / "run", tmp_path / "ready"
    args = train_args(run, small_dataset, "--set", "checkpoint.every=2", "--set", "train.steps=6",
                      "--set", "checkpoint.async_save=true")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_write.py"), "4",
                             str(ready), *args], cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not (
            ready.exists() and (run / "metrics.jsonl").is_file() and 6 in logged_steps(run)):
        time.sleep(0.05)
    try:
        assert ready.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "timeout"
        # the writer of step 4 never finishes, yet steps 5 and 6 trained meanwhile; the run now
        # waits for the write before its final save
        assert logged_steps(run)[-2:] == [5, 6] and latest(run) == "step_00000002"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its forked writer processes
        proc.wait()
    assert latest(run) == "step_00000002"
    tmp = run / "checkpoints" / ".tmp-step_00000004"
    assert tmp.is_dir() and not (tmp / ".metadata").exists()  # the interrupted save
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "did not finish" in r.stderr and f"resumed from {run}/checkpoints/step_00000002" in r.stderr
    assert latest(run) == "step_00000006" and not tmp.exists()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigusr1_saves_and_exits_with_the_requeue_code(small_dataset, tmp_path, async_save):
    from mmpretrain.train.preempt import REQUEUE_EXIT_CODE

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mmpretrain",
                             *train_args(run, small_dataset, "--set", "train.steps=1000",
                                         "--set", f"checkpoint.async_save={async_save}")],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    saved = latest(run)
    step = int(saved.split("_")[1])
    assert 1 <= step < 1000 and logged_steps(run)[-1] == step
    assert (run / "checkpoints" / saved / ".metadata").is_file()  # complete before the exit
    assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("extra", [["checkpoint.async_save=false"], ["checkpoint.async_save=true"],
                                   ["data.workers=2"]], ids=["sync", "async", "data-workers"])
def test_a_signal_to_every_process_of_the_job_still_saves(small_dataset, tmp_path, extra):
    """Slurm's preemption and scancel signal every process of the job, not only the trainer: the
    checkpoint writer's helper processes (started by the first save) and the data workers must
    outlive the signal, so that the trainer saves its stop checkpoint and exits to be requeued."""
    from mmpretrain.train.preempt import REQUEUE_EXIT_CODE, STOPPED_FILE

    run = tmp_path / "run"
    sets = [a for e in ["train.steps=1000", "checkpoint.every=2", "logging.every=100", *extra]
            for a in ("--set", e)]
    proc = subprocess.Popen([sys.executable, "-m", "mmpretrain",
                             *train_args(run, small_dataset, *sets)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job's
    try:
        deadline = time.time() + 240
        while not (run / "checkpoints" / "latest").exists() and time.time() < deadline:
            time.sleep(0.05)
        first = int(latest(run).split("_")[1])
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    saved = latest(run)
    assert int(saved.split("_")[1]) > first and (run / "checkpoints" / saved / ".metadata").is_file()
    assert logged_steps(run)[-1] == int(saved.split("_")[1])  # the stop's record, off the cadence
    assert (run / STOPPED_FILE).is_file() and not list((run / "checkpoints").glob(".tmp-*"))


def test_a_stop_asked_during_start_up_exits_for_a_requeue(small_dataset, tmp_path):
    """SIGTERM while the trainer is still starting (here: as it reads its config, before the
    slow imports), when Python's default action would end it with 143 and no requeue: it exits
    75 before the first step, with stopped.json naming step 0, and the requeued run trains."""
    from mmpretrain.train.preempt import REQUEUE_EXIT_CODE, STOPPED_FILE

    run = tmp_path / "run"
    code = ("import os, signal, sys; import mmpretrain.config as c; from mmpretrain.cli import main\n"
            "load = c.load\n"
            "def signalled(*a):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return load(*a)\n"
            "c.load = signalled\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, *train_args(run, small_dataset)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == REQUEUE_EXIT_CODE, r.stderr[-3000:]
    assert "asked to stop (SIGTERM) before the first step" in r.stderr
    assert json.loads((run / STOPPED_FILE).read_text()) == {"step": 0}
    assert not (run / "checkpoints" / "latest").exists()
    r = cli(*train_args(run, small_dataset))
    assert r.returncode == 0, r.stderr[-3000:]
    assert latest(run) == "step_00000004"


def test_a_resume_on_changed_data_says_what_changed(small_dataset, tmp_path):
    """Exact resume needs the same sample stream: a resume whose data settings or dataset sizes
    differ from the checkpoint's names them; one that changes only how data are read does not."""
    from mmpretrain.config import load
    from mmpretrain.train.resume import data_changes

    run = tmp_path / "run"
    assert cli(*train_args(run, small_dataset, "--set", "train.steps=2")).returncode == 0
    r = cli(*train_args(run, small_dataset, "--set", "train.steps=3", "--set", "data.workers=1"))
    assert r.returncode == 0 and "the data differ" not in r.stderr, r.stderr[-3000:]
    r = cli(*train_args(run, small_dataset, "--set", "train.steps=4", "--set", "data.shuffle_seed=5"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the data differ from the checkpoint's (data.shuffle_seed 0 -> 5)" in r.stderr
    assert "micro-batches per global batch" not in r.stderr
    r = cli(*train_args(run, small_dataset, "--set", "train.steps=5", "--set", "data.shuffle_seed=5",
                        "--set", "data.micro_batch_size=1"))  # a global batch of twice the slots
    assert r.returncode == 0 and "the data differ" not in r.stderr, r.stderr[-3000:]
    assert "micro-batches per global batch 1 -> 4" in r.stderr
    ckpt = run / "checkpoints" / latest(run)
    saved = json.loads(next(ckpt.glob("loader_dp0.json")).read_text())["sizes"]
    cfg = load(ckpt / "config.yaml", [])
    assert data_changes(ckpt, cfg, saved, saved) == []
    assert data_changes(ckpt, cfg, saved, [saved[0] + 1]) == [
        f"dataset sizes {saved} -> {[saved[0] + 1]}"]
    assert data_changes(ckpt, cfg, None, [1]) == []  # a state saved before sizes were recorded
