"""`mmpretrain slurm render`: an sbatch script for a job config, from slurm/train.sbatch.in.

The template's `{{name}}` fields are filled from the config and the command line. Rendering checks
the layout against the node count first (world size divisible by tp*pp, heads by tp, layers by the
pipeline stages, global batch by micro-batch x dp, ...), so a job that cannot start is never
submitted. Paths are made absolute: the job runs from the directory rendering ran in (`--chdir`).
"""
from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from mmpretrain.config import ConfigError, load

log = logging.getLogger("mmpretrain")
TEMPLATE = Path(str(resources.files("mmpretrain.sbatch") / "train.sbatch.in"))
FIELD = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class JobSpec:
    """What `slurm render` needs besides the template."""

    config: str
    nodes: int
    gpus_per_node: int = 8
    run_dir: str | None = None
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    container: str | None = None
    mounts: list[str] = field(default_factory=list)
    python: str | None = None
    job_name: str | None = None
    overrides: list[str] = field(default_factory=list)
    signal_seconds: int = 600
    workdir: str | None = None
    output: str | None = None  # the file `-o` writes the script to (else stdout)

    @property
    def script(self) -> str:
        """The script's file, as the header's `sbatch` line names it."""
        return self.output or "job.sbatch"


def time_seconds(limit: str) -> int | None:
    """Seconds of a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S; None for none (0,
    UNLIMITED, INFINITE)."""
    if limit.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit.strip())
    if not m:
        raise ConfigError(f"--time {limit!r}: expected minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]] "
                          "or UNLIMITED")
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        parts = [int(a), int(b or 0), int(c or 0)]
        seconds = int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    elif b is None:
        seconds = int(a) * 60
    elif c is None:
        seconds = int(a) * 60 + int(b)
    else:
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    return seconds or None


def check_spec(spec: JobSpec):
    """Load the config with its overrides and check the layout for the node count."""
    from mmpretrain.planner.layout import check

    if spec.nodes < 1 or spec.gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be positive, got {spec.nodes}, "
                          f"{spec.gpus_per_node}")
    if spec.signal_seconds <= 0:
        raise ConfigError(f"--signal-seconds {spec.signal_seconds}: must be positive (how long "
                          "before the time limit the run is asked to save and stop)")
    limit = time_seconds(spec.time)
    if limit is not None and spec.signal_seconds >= limit:
        raise ConfigError(f"--signal-seconds {spec.signal_seconds} must be below the time limit "
                          f"({limit} s)")
    _check_text(spec)
    cfg = load(spec.config, spec.overrides)
    check(cfg, spec.nodes * spec.gpus_per_node)
    return cfg


def _check_text(spec: JobSpec) -> None:
    """No line breaks anywhere (a value split over lines would turn the rest of a comment into
    commands), and no blanks or quotes in what `#SBATCH` lines hold (sbatch reads them unquoted)."""
    words = {"config": spec.config, "--run-dir": spec.run_dir, "--time": spec.time,
             "--partition": spec.partition, "--account": spec.account,
             "--container": spec.container, "--python": spec.python,
             "--job-name": spec.job_name, "-o": spec.output, "working directory": spec.workdir,
             **{f"--mounts {m}": m for m in spec.mounts}, **{f"--set {o}": o for o in spec.overrides}}
    for name, word in words.items():
        if word is not None and any(ord(c) < 32 or ord(c) == 127 for c in word):
            raise ConfigError(f"{name}: holds a line break or control character")
    workdir, run_dir = _paths(spec)
    directives = {"--job-name": job_name(spec), "--partition": spec.partition,
                  "--account": spec.account, "--time": spec.time,
                  "--run-dir (#SBATCH --output)": str(run_dir),
                  "working directory (#SBATCH --chdir)": str(workdir)}
    for name, word in directives.items():
        if word is not None and re.search(r"[\s'\"#%]", word):
            raise ConfigError(f"{name} {word!r}: an #SBATCH line cannot hold blanks, quotes, '#' "
                              f"or '%' (a Slurm filename pattern); choose a value without them"
                              + (" (or a --job-name)" if name == "--job-name" else ""))


def _paths(spec: JobSpec) -> tuple[Path, Path]:
    """The job's working directory (where rendering ran) and its run directory, absolute."""
    workdir = Path(spec.workdir or ".").resolve()
    return workdir, (workdir / (spec.run_dir or f"runs/{Path(spec.config).stem}")).resolve()


def _sbatch_extra(spec: JobSpec, workdir: Path) -> str:
    lines = [f"#SBATCH --chdir={workdir}"]
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        lines.append(f"#SBATCH --account={spec.account}")
    return "\n".join(lines)


def _container(spec: JobSpec, workdir: Path) -> str:
    """pyxis/enroot flags for srun (empty without a container image); the working directory is
    mounted at its own path, `--mounts` adds the config's, data's and run's locations."""
    if not spec.container:
        return ""
    flags = [f"--container-image={spec.container}", f"--container-workdir={workdir}",
             "--no-container-mount-home",
             "--container-mounts=" + ",".join([f"{workdir}:{workdir}", *spec.mounts])]
    return " ".join(_quote(f) for f in flags)


def render_command(spec: JobSpec) -> str:
    """The `mmpretrain slurm render` command that gives this script."""
    args = ["mmpretrain", "slurm", "render", spec.config, "--nodes", str(spec.nodes),
            "--gpus-per-node", str(spec.gpus_per_node), "--time", spec.time]
    for flag, value in (("--partition", spec.partition), ("--account", spec.account),
                        ("--container", spec.container), ("--run-dir", spec.run_dir),
                        ("--python", spec.python), ("--job-name", spec.job_name)):
        if value:
            args += [flag, value]
    if spec.signal_seconds != JobSpec.signal_seconds:
        args += ["--signal-seconds", str(spec.signal_seconds)]
    args += [a for m in spec.mounts for a in ("--mounts", m)]
    args += [a for o in spec.overrides for a in ("--set", o)]
    if spec.output:
        args += ["-o", spec.output]
    return shlex.join(args)


def render(spec: JobSpec) -> str:
    """The sbatch script for `spec` (the layout is checked first; ConfigError if it is bad)."""
    from mmpretrain.train.preempt import REQUEUE_EXIT_CODE, STOPPED_FILE

    cfg = check_spec(spec)
    workdir, run_dir = _paths(spec)
    _check_init_from(cfg.checkpoint.init_from, workdir, run_dir)
    config = (workdir / spec.config).resolve()
    python = spec.python or ("python" if spec.container else _default_python())
    values = {
        "script": spec.script, "render_command": render_command(spec), "config": str(config),
        "run_dir": str(run_dir), "nodes": str(spec.nodes), "gpus_per_node": str(spec.gpus_per_node),
        "signal_seconds": str(spec.signal_seconds), "requeue_code": str(REQUEUE_EXIT_CODE),
        "stopped_file": STOPPED_FILE,
        "job_name": job_name(spec), "time": spec.time,
        "sbatch_extra": _sbatch_extra(spec, workdir), "config_q": shlex.quote(str(config)),
        "run_dir_q": shlex.quote(str(run_dir)), "python_q": shlex.quote(python),
        "overrides": " ".join(_quote(a) for o in spec.overrides for a in ("--set", o)),
        "container": _container(spec, workdir),
    }
    text = FIELD.sub(lambda m: values[m.group(1)], TEMPLATE.read_text())
    return text


def _has_checkpoint(path: Path) -> bool:
    """A checkpoint directory, or a run directory with a latest checkpoint."""
    return (path / "state.json").is_file() or (path / "checkpoints" / "latest").is_file()


def _check_init_from(init_from: str, workdir: Path, run_dir: Path) -> None:
    """Warn when the job would start from checkpoint.init_from (its run has no checkpoint of its
    own) and that names no checkpoint yet: stage 1 may still be running, so it is not an error."""
    if not init_from or _has_checkpoint(run_dir):
        return
    source = workdir / init_from  # the job runs in workdir; an absolute init_from stays as it is
    if not _has_checkpoint(source):
        log.warning("checkpoint.init_from %s: no checkpoint there yet (seen from %s); the job "
                    "fails at start unless one is saved before it starts", init_from, workdir)


def job_name(spec) -> str:
    """--job-name, or mmp-<config file stem>."""
    return spec.job_name or f"mmp-{Path(spec.config).stem}"


def _quote(word: str) -> str:
    """`word` in single quotes, always (shlex leaves commas bare, which shellcheck flags in arrays)."""
    return "'" + word.replace("'", "'\\''") + "'"


def _default_python() -> str:
    """The interpreter running this command (a venv's python keeps its packages)."""
    import sys

    return sys.executable


def log_dir(script_text: str) -> Path:
    """The directory of the script's `--output` log (Slurm does not create it)."""
    m = re.search(r"^#SBATCH --output=(.+)$", script_text, re.M)
    return Path(m.group(1)).parent
