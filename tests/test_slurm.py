"""Rendered sbatch scripts: valid bash, clean under shellcheck, and, run on CPU with stand-in
srun/scontrol, a 2-rank training job that checkpoints and requeues itself on USR1."""
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmpretrain.config import ConfigError
from mmpretrain.slurm import JobSpec, render, time_seconds
from mmpretrain.train.preempt import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted(ROOT.glob("jobs/nvlm-*.yaml"))  # every design, both scales and stages

# srun: start SLURM_NTASKS copies of the command (everything from the first non-option word), each
# with its SLURM_PROCID/SLURM_LOCALID; forward USR1 to them, and answer TERM by killing them, as
# srun does ("forcing job termination": SIGKILL to every task). --kill-on-bad-exit, at its worst:
# the first failure kills the other tasks, and srun exits with 128 + SIGKILL as though one of them
# had still been tearing down (srun returns the highest exit code, a signal counting as 128 + it).
FAKE_SRUN = r'''#!PYTHON
import os, signal, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
n = int(os.environ["SLURM_NTASKS"])
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write(f"srun {n} tasks: {args[:2]}\n")
procs = [subprocess.Popen(args, env={**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                                     "SLURM_NODEID": "0"}) for i in range(n)]
def forward(sig, frame):
    for p in procs:
        p.send_signal(signal.SIGKILL if sig == signal.SIGTERM else sig)
signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
import time
while all(p.poll() in (None, 0) for p in procs) and any(p.poll() is None for p in procs):
    time.sleep(0.05)
for p in procs:
    if p.poll() is None:
        p.kill()
codes = [p.wait() for p in procs]
sys.exit(0 if all(c == 0 for c in codes) else 128 + signal.SIGKILL)
'''
FAKE_SCONTROL = r'''#!/bin/bash
case "$1" in
  show) if [[ -n "${FAKE_SCONTROL_DELAY:-}" ]]; then
          echo "show hostnames" >> "$FAKE_SLURM_LOG"; sleep "$FAKE_SCONTROL_DELAY"
        fi
        echo 127.0.0.1 ;;
  requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
  *) exit 1 ;;
esac
'''


def shellcheck() -> str:
    """shellcheck's path; missing is a failure, not a skip (`make test` installs it)."""
    path = shutil.which("shellcheck")
    assert path, "shellcheck is not installed: apt-get install -y shellcheck (make test does it)"
    return path


def check_script(path: Path) -> None:
    subprocess.run(["bash", "-n", str(path)], check=True)
    r = subprocess.run([shellcheck(), "-s", "bash", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_shipped_jobs_render_clean_scripts(job, tmp_path):
    nodes = int(job.read_text().split("--nodes ")[1].split()[0])
    plain = render(JobSpec(str(job.relative_to(ROOT)), nodes, run_dir=str(tmp_path / "run"),
                           workdir=str(ROOT)))
    pyxis = render(JobSpec(str(job), nodes, run_dir=str(tmp_path / "run"), partition="batch",
                           account="proj", time="2-00:00:00", container="nvcr.io/nvidia/pytorch:25.01-py3",
                           mounts=["/lustre:/lustre,/data:/data"], overrides=["train.steps=10"],
                           workdir=str(ROOT)))
    for name, text in (("plain", plain), ("pyxis", pyxis)):
        assert text.startswith("#!/bin/bash\n# sbatch ")
        (tmp_path / f"{name}.sbatch").write_text(text)
        check_script(tmp_path / f"{name}.sbatch")
        assert f"#SBATCH --nodes={nodes}\n" in text and "#SBATCH --signal=B:USR1@600" in text
        assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}" in text
    assert "--container-image=nvcr.io" in pyxis and "--container-image" not in plain
    assert "#SBATCH --partition=batch" in pyxis and "--set' 'train.steps=10'" in pyxis


@pytest.mark.parametrize("nodes, gpus, sets, needle", [
    (1, 6, [], "not divisible by parallel.tp x parallel.pp"),
    (3, 8, ["parallel.tp=3"], "num_attention_heads"),
    (4, 8, ["train.global_batch_size=100"], "global_batch_size"),
    (3, 8, ["parallel.pp=3"], "num_layers"),
    (2, 8, ["parallel.tp=2", "decoder.ffn_hidden_size=14337"], "ffn_hidden_size"),
])
def test_render_rejects_layouts_that_cannot_start(nodes, gpus, sets, needle):
    with pytest.raises(ConfigError, match=needle):
        render(JobSpec("jobs/nvlm-d-8b-pretrain.yaml", nodes, gpus, overrides=sets, workdir=str(ROOT)))


def test_render_command_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "mmpretrain", "slurm", "render",
                        "jobs/nvlm-d-72b-pretrain.yaml", "--nodes", "3"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "world size 24 is not divisible" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout


def test_time_limits():
    assert time_seconds("30") == 1800 and time_seconds("10:30") == 630
    assert time_seconds("04:00:00") == 14400 and time_seconds("1-12") == 129600
    assert time_seconds("2-00:30:00") == 174600
    assert time_seconds("0") is time_seconds("UNLIMITED") is time_seconds("infinite") is None
    with pytest.raises(ConfigError, match="--time"):
        time_seconds("four hours")
    with pytest.raises(ConfigError, match="signal-seconds 600 must be below the time limit"):
        render(JobSpec("jobs/nvlm-d-8b-align.yaml", 2, time="5", workdir=str(ROOT)))
    with pytest.raises(ConfigError, match="signal-seconds 0: must be positive"):
        render(JobSpec("jobs/nvlm-d-8b-align.yaml", 2, signal_seconds=0, workdir=str(ROOT)))
    for limit in ("UNLIMITED", "0"):  # no time limit: the signal only comes with a preemption
        text = render(JobSpec("jobs/nvlm-d-8b-align.yaml", 2, time=limit, workdir=str(ROOT)))
        assert f"#SBATCH --time={limit}\n" in text and "#SBATCH --signal=B:USR1@600\n" in text


def fake_slurm_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN.replace("PYTHON", sys.executable, 1)),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, proc) -> None:
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the job ended early:\n" + proc.stdout.read()[-4000:]
        assert time.time() < end, "timed out"
        time.sleep(0.5)


def test_rendered_job_trains_two_ranks_then_checkpoints_and_requeues_on_usr1(tmp_path, small_dataset):
    run = tmp_path / "run"
    spec = JobSpec("jobs/tiny-d.yaml", nodes=1, gpus_per_node=2, run_dir=str(run), time="00:30:00",
                   signal_seconds=60, python=sys.executable, workdir=str(ROOT), overrides=[
                       f"data.path={small_dataset}", "data.seq_length=128", "data.micro_batch_size=2",
                       "data.image_token_budget=16", "train.global_batch_size=4", "train.steps=1000",
                       "logging.every=1", "logging.tensorboard=false"])
    script = tmp_path / "job.sbatch"
    script.write_text(render(spec))
    check_script(script)
    log = tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{fake_slurm_bin(tmp_path)}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node001", "SLURM_NNODES": "1",
           "SLURM_NTASKS": "2", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "FAKE_SLURM_LOG": str(log), "PYTHONWARNINGS": "ignore"}
    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        metrics = run / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 240, job)
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@60 does: the batch shell only
        out, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-4000:]
    assert "received SIGUSR1" in out and "requeueing job 4242" in out
    assert "asked to stop (" in out and "then exit 75 for a requeue" in out
    assert log.read_text().splitlines() == ["srun 2 tasks: ['bash', '-c']", "requeue 4242"]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{steps[-1]:08d}" and 2 <= steps[-1] < 1000, (latest, steps)
    assert (run / "checkpoints" / latest / "state.json").is_file()
    assert (run / "logs").is_dir()
    assert json.loads((run / "stopped.json").read_text()) == {"step": steps[-1]}


def test_a_failed_job_is_not_requeued_for_an_old_stop(tmp_path, small_dataset):
    """A stop file left by an earlier stop is removed before srun starts: a run that then fails
    ends the job with srun's status instead of requeueing it."""
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "stopped.json").write_text('{"step": 3}\n')
    spec = JobSpec("jobs/tiny-d.yaml", nodes=1, gpus_per_node=2, run_dir=str(run),
                   python=sys.executable, workdir=str(ROOT),
                   overrides=[f"data.path={tmp_path / 'no-such-data'}"])
    script = tmp_path / "job.sbatch"
    script.write_text(render(spec))
    log = tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{fake_slurm_bin(tmp_path)}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4243", "SLURM_JOB_NODELIST": "node001", "SLURM_NNODES": "1",
           "SLURM_NTASKS": "2", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "FAKE_SLURM_LOG": str(log), "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, text=True, capture_output=True,
                       timeout=240)
    assert r.returncode == 128 + signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    assert "requeue" not in log.read_text() and not (run / "stopped.json").exists()


# The trainer as far as the script sees it (MMPRETRAIN_PYTHON): STUB_START_S of start-up, in which a
# USR1 kills it (the default action), then a USR1 makes it write the stop file and exit 75.
STUB_TASK = r"""#!/bin/bash
while [[ $# -gt 0 && "$1" != --run-dir ]]; do shift; done
run=$2
sleep "${STUB_START_S:-0}"
trap 'echo "{\"step\": 7}" > "$run/stopped.json"; exit 75' USR1
echo "task $SLURM_PROCID ready" >> "$FAKE_SLURM_LOG"
while true; do sleep 0.05; done
"""


@pytest.mark.parametrize("when,sig", [("running", "USR1"), ("running", "TERM"),
                                      ("before srun", "USR1"), ("starting", "USR1")])
def test_a_stop_for_the_batch_shell_requeues_the_job(tmp_path, when, sig):
    """USR1 or TERM for the batch shell alone (--signal=B:USR1, `scancel --batch`): the tasks are
    asked to stop with USR1 (srun kills them on TERM), and the job requeues; a stop before srun
    starts requeues it without starting srun, one while the tasks start (and die of it) too."""
    run = tmp_path / "run"
    spec = JobSpec("jobs/tiny-d.yaml", nodes=1, gpus_per_node=2, run_dir=str(run), workdir=str(ROOT))
    script = tmp_path / "job.sbatch"
    script.write_text(render(spec))
    stub = tmp_path / "stub-python"
    stub.write_text(STUB_TASK)
    stub.chmod(0o755)
    log = tmp_path / "slurm.log"
    log.touch()
    env = {**os.environ, "PATH": f"{fake_slurm_bin(tmp_path)}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4300", "SLURM_JOB_NODELIST": "node001", "SLURM_NNODES": "1",
           "SLURM_NTASKS": "2", "FAKE_SLURM_LOG": str(log), "MMPRETRAIN_PYTHON": str(stub),
           "STUB_START_S": "5" if when == "starting" else "0",
           **({"FAKE_SCONTROL_DELAY": "3"} if when == "before srun" else {})}
    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ready = {"before srun": "show hostnames", "starting": "srun 2 tasks"}.get(when,
                                                                                "task 1 ready")
        wait_for(lambda: ready in log.read_text(), 30, job)
        job.send_signal(getattr(signal, f"SIG{sig}"))
        out, _ = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    assert f"received SIG{sig}" in out and "requeueing job 4300" in out, out[-3000:]
    assert log.read_text().splitlines()[-1] == "requeue 4300"
    assert ("srun 2 tasks" in log.read_text()) == (when != "before srun")
    assert (run / "stopped.json").exists() == (when == "running")


def test_the_rendezvous_host_of_a_long_node_list(tmp_path):
    """The first of 200,000 host names under pipefail: a reader that stops after one line would
    leave scontrol to die of SIGPIPE, and the script with it."""
    text = render(JobSpec("jobs/tiny-d.yaml", nodes=1, gpus_per_node=1, workdir=str(ROOT)))
    line = next(x for x in text.splitlines() if x.startswith("MASTER_ADDR="))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\nseq -f "node%06g" 1 200000\n')
    (bin_dir / "scontrol").chmod(0o755)
    r = subprocess.run(["bash", "-c", f'set -euo pipefail; {line}; echo "$MASTER_ADDR"'],
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                            "SLURM_JOB_NODELIST": "node[000001-200000]"},
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "node000001\n"), r.stderr


def test_a_stage_two_job_warns_when_its_init_from_has_no_checkpoint(tmp_path, caplog):
    """Rendering stage 2 before stage 1 has saved: a warning, not an error (stage 1 may still be
    running); none once it has a checkpoint, or once the run has one of its own."""
    spec = JobSpec(str(ROOT / "jobs/nvlm-d-8b-pretrain.yaml"), 4, workdir=str(tmp_path))
    render(spec)
    assert "checkpoint.init_from runs/nvlm-d-8b-align: no checkpoint there yet" in caplog.text
    for run in ("runs/nvlm-d-8b-align", "runs/nvlm-d-8b-pretrain"):  # stage 1's, or its own
        caplog.clear()
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        (tmp_path / run / "checkpoints" / "latest").write_text("step_00000010\n")
        render(spec)
        assert "init_from" not in caplog.text
        shutil.rmtree(tmp_path / run)


def test_the_rendered_by_line_renders_the_same_script(tmp_path, monkeypatch, capsys):
    from mmpretrain.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "a.sbatch"
    assert main(["slurm", "render", "jobs/nvlm-d-8b-align.yaml", "--nodes", "2", "--time", "2:00:00",
                 "--signal-seconds", "300", "--run-dir", str(tmp_path / "run"), "--job-name", "j1",
                 "--set", "train.steps=7", "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"#!/bin/bash\n# sbatch {out}\n") and "#SBATCH --signal=B:USR1@300" in text
    command = shlex.split(re.search(r"^# Rendered by: (.+)$", text, re.M).group(1))
    assert command[:3] == ["mmpretrain", "slurm", "render"] and "--signal-seconds" in command
    out.unlink()
    assert main(command[1:]) == 0
    assert out.read_text() == text
    shutil.rmtree(tmp_path / "run")
    bad = tmp_path / "missing" / "a.sbatch"
    assert main(["slurm", "render", "jobs/nvlm-d-8b-align.yaml", "--nodes", "2", "--run-dir",
                 str(tmp_path / "run"), "-o", str(bad)]) == 2
    assert f"-o {bad}: cannot write it (No such file or directory)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing made for a script that was not written


@pytest.mark.parametrize("field, value, needle", [
    ("overrides", ["train.steps=10\nrm -rf ~"], "--set train.steps=10"),
    ("mounts", ["/a:/a\necho"], "line break"),
    ("job_name", "my job", "--job-name 'my job'"),
    ("partition", "a#b", "--partition"),
    ("run_dir", "runs/with space", "--run-dir"),
    ("run_dir", "runs/p%j", "'%' (a Slurm filename pattern)"),
])
def test_render_rejects_text_a_script_cannot_hold(field, value, needle):
    spec = JobSpec("jobs/nvlm-d-8b-align.yaml", 2, workdir=str(ROOT), **{field: value})
    with pytest.raises(ConfigError, match=re.escape(needle)):
        render(spec)


def test_the_job_name_taken_from_the_config_file_is_checked_too(tmp_path):
    shutil.copy(ROOT / "jobs/nvlm-d-8b-align.yaml", tmp_path / "my job.yaml")
    spec = JobSpec(str(tmp_path / "my job.yaml"), 2, workdir=str(ROOT), run_dir=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match=re.escape("--job-name 'mmp-my job'")):
        render(spec)
    assert "--job-name=mmp-j1" in render(dataclasses.replace(spec, job_name="mmp-j1"))
