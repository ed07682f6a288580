"""The wheel `pip install .` builds holds every module and the sbatch template, and works without
the source tree: a cluster image installs the project, it does not mount the clone."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def package_dirs() -> dict[str, Path]:
    """Import name -> source directory of every package the project's source tree holds."""
    mapped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    roots = {"mmpretrain": ROOT / "mmpretrain"} | {name: ROOT / d for name, d in mapped.items()}
    found = {}
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found[".".join((name, *rel))] = init.parent
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source (a build writes build/ next to pyproject.toml)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for d in {p.relative_to(ROOT).parts[0] for p in package_dirs().values()}:
        shutil.copytree(ROOT / d, src / d, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(src), "-w", str(tmp)], check=True, capture_output=True)
    (whl,) = tmp.glob("mmpretrain-*.whl")
    return whl


def test_the_wheel_holds_every_module_and_the_sbatch_template(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = []
    for pkg, d in package_dirs().items():
        prefix = pkg.replace(".", "/")
        missing += [f"{prefix}/{f.name}" for f in d.glob("*.py") if f"{prefix}/{f.name}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "mmpretrain/sbatch/train.sbatch.in" in names


def run_installed(target: Path, cwd: Path, code: str) -> subprocess.CompletedProcess:
    """Python without the editable install: site-packages on the path, but no .pth files run
    (-S), so `mmpretrain` resolves to `target` alone."""
    site = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    prelude = f"import sys; sys.path[:0] = {[str(target), *site]!r}\n"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-S", "-c", prelude + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_installed_wheel_plans_and_renders_a_job_without_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    modules = sorted(package_dirs())
    r = run_installed(target, tmp_path, f"""
import importlib, mmpretrain
assert mmpretrain.__file__.startswith({str(target)!r}), mmpretrain.__file__
for m in {modules!r}:
    importlib.import_module(m)
""")
    assert r.returncode == 0, r.stderr
    job = ROOT / "jobs" / "tiny-d.yaml"
    cli = "from mmpretrain.cli import main; sys.exit(main({}))"
    args = ["plan", str(job), "--nodes", "1", "--gpus-per-node", "1", "--set", "decoder.vocab_size=1024"]
    plan = run_installed(target, tmp_path, cli.format(args))
    assert plan.returncode == 0, plan.stderr
    here = subprocess.run([sys.executable, "-m", "mmpretrain", *args], cwd=tmp_path,
                          capture_output=True, text=True, env={"OMP_NUM_THREADS": "1"})
    assert plan.stdout == here.stdout and "step" in plan.stdout
    version = run_installed(target, tmp_path, cli.format(["--version"]))
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version.stdout.strip() == f"mmpretrain {want}", version.stderr
    render = run_installed(target, tmp_path, cli.format(
        ["slurm", "render", str(job), "--nodes", "1", "--gpus-per-node", "1"]))
    assert render.returncode == 0, render.stderr
    assert "#SBATCH --nodes=1" in render.stdout and "srun" in render.stdout
    # `python -m mmpretrain` in the source tree's root (a container's --container-workdir, with the
    # wheel installed into its Python): the working directory comes first on sys.path, so the
    # source tree's mmpretrain/ hides the install and has to find parallel/, data/, slurm/ itself
    shadowed = "sys.path.insert(0, ''); import mmpretrain; assert mmpretrain.__file__.startswith(" \
               f"{str(ROOT)!r}), mmpretrain.__file__; " + cli
    for command in (args, ["slurm", "render", str(job), "--nodes", "1", "--gpus-per-node", "1"]):
        r = run_installed(target, ROOT, shadowed.format(command))
        assert r.returncode == 0, r.stderr
    assert run_installed(target, ROOT, shadowed.format(args)).stdout == plan.stdout
