"""Build an offline bundle of what a GPU node needs beyond its own Python to run mmpretrain's GPU
path (Transformer Engine, DALI, megatron-core, mosaicml-streaming), for nodes that reach no package
index, in parts small enough for a size-limited copy.

    .venv/bin/python tools/gpu_bundle.py [--out .gpu] [--node-packages tools/gpu_node_packages.txt] \\
        [--python 3.12] [--glibc 2.28] [--part-mib 56] [--leave-out NAME ...]

What goes in: every pin of requirements.lock that the node's Python does not already have (the
node's distributions are listed in --node-packages, one name per line, e.g. from
`python3 -m pip list --format=freeze` there), minus development tools, plus Transformer Engine
(the core wheel for CUDA 13 and the source of its PyTorch extension, which is built on the node
against the node's torch: tools/gpu_install.sh). Wheels are fetched for the node's Python and
x86-64 Linux. The result is <out>/parts/bundle.tar.partNN and <out>/parts/SHA256SUMS; copy the
parts to the node (all at once or over several copies) and run tools/gpu_install.sh there.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TE_VERSION = "2.11.0"  # megatron-core 0.16.1 takes Transformer Engine >=2.9,<2.12
TE_WHEELS = [f"transformer_engine=={TE_VERSION}", f"transformer_engine_cu13=={TE_VERSION}",
             "pydantic==2.14.3", "pydantic_core==2.50.4", "annotated-types==0.8.0",
             "typing-inspection==0.4.5", "importlib_metadata==10.2.0", "zipp==4.1.2"]
TE_SOURCE = f"transformer_engine_torch=={TE_VERSION}"
DEV_ONLY = {"pytest", "ruff", "iniconfig", "pluggy", "pygments"}
OLD_TAGS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]


def platforms(glibc: str) -> list[str]:
    """The manylinux tags a node with this glibc (major.minor) takes."""
    major, minor = (int(x) for x in glibc.split("."))
    return OLD_TAGS + [f"manylinux_{major}_{m}_x86_64" for m in range(5, minor + 1)]


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> set[str]:
    """Distribution names of a pip-freeze-like file (comments and versions ignored)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(normalise(re.split(r"[=<>!~ @\[]", line)[0]))
    return names


def wanted(lock: Path, have: set[str]) -> list[str]:
    """The pins the node lacks: requirements.lock and Transformer Engine's wheels, minus `have`
    (normalised names)."""
    pins = [ln.strip() for ln in lock.read_text().splitlines() if "==" in ln and not ln.startswith("#")]
    pins += TE_WHEELS
    out, seen = [], set()
    for pin in pins:
        name = normalise(pin.split("==")[0])
        if name not in have and name not in DEV_ONLY and name not in seen:
            seen.add(name)
            out.append(pin)
    return out


def download(pins: list[str], dest: Path, python: str, glibc: str) -> list[str]:
    """Fetch each pin's wheel for CPython `python` on x86-64 Linux with `glibc`, and the TE
    extension's source. A pin with no such wheel falls back to the newest version that has one
    (pip's reason is printed); returns those pins."""
    abi = "cp" + python.replace(".", "")
    tags = [a for p in platforms(glibc) for a in ("--platform", p)]
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest)]
    binary = pip + ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                    "--abi", abi, "--abi", "abi3", "--abi", "none", *tags]
    substituted = []
    for i, pin in enumerate(pins):
        print(f"[{i + 1}/{len(pins)}] {pin}", flush=True)
        first = subprocess.run(binary + [pin], stderr=subprocess.PIPE, text=True)
        if first.returncode != 0:
            print(first.stderr.strip().splitlines()[-1] if first.stderr.strip() else "pip failed",
                  file=sys.stderr)
            subprocess.run(binary + [pin.split("==")[0]], check=True)
            substituted.append(pin)
    # The extension has only a source release; preparing its metadata imports torch (so no isolation).
    subprocess.run(pip + ["--no-binary=:all:", "--no-build-isolation", TE_SOURCE], check=True)
    return substituted


def pack(src: Path, parts_dir: Path, part_bytes: int) -> list[Path]:
    """Tar `src`'s files into parts of at most part_bytes, with a SHA256SUMS of the parts and of
    the whole tar (its line is named bundle.tar)."""
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    whole = parts_dir / "bundle.tar"
    with tarfile.open(whole, "w") as tar:
        for f in sorted(src.iterdir()):
            tar.add(f, arcname=f.name)
    parts, digests = [], []
    with whole.open("rb") as fh:
        while chunk := fh.read(part_bytes):
            part = parts_dir / f"bundle.tar.part{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
            digests.append(f"{hashlib.sha256(chunk).hexdigest()}  {part.name}")
    digests.append(f"{sha256(whole)}  bundle.tar")
    (parts_dir / "SHA256SUMS").write_text("\n".join(digests) + "\n")
    whole.unlink()
    return parts


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu")
    ap.add_argument("--node-packages", type=Path, default=ROOT / "tools" / "gpu_node_packages.txt")
    ap.add_argument("--python", default="3.12", help="the node's Python version (major.minor)")
    ap.add_argument("--glibc", default="2.28", help="the node's glibc version (major.minor): the "
                    "newest manylinux wheels it takes")
    ap.add_argument("--part-mib", type=int, default=56)
    ap.add_argument("--leave-out", nargs="*", default=[], metavar="NAME",
                    help="distributions not to bundle, e.g. the cloud-storage clients that "
                         "mosaicml-streaming imports only to read remote shards: oci boto3 botocore")
    args = ap.parse_args(argv)
    for flag, value in (("--python", args.python), ("--glibc", args.glibc)):
        if not re.fullmatch(r"\d+\.\d+", value):
            ap.error(f"{flag} {value}: give major.minor, e.g. 3.12")
    if args.part_mib < 1:
        ap.error(f"--part-mib {args.part_mib}: at least 1")
    if importlib.util.find_spec("torch") is None:
        ap.error("this Python has no torch, which fetching TE's extension source needs: run "
                 ".venv/bin/python tools/gpu_bundle.py")
    every = {normalise(p.split("==")[0]) for p in wanted(ROOT / "requirements.lock", set())}
    if unknown := [n for n in args.leave_out if normalise(n) not in every]:
        ap.error(f"--leave-out {' '.join(unknown)}: not among what the bundle would hold")
    if not args.node_packages.is_file():
        ap.error(f"--node-packages {args.node_packages}: no such file")
    have = read_names(args.node_packages) | {normalise(n) for n in args.leave_out}
    pins = wanted(ROOT / "requirements.lock", have)
    wheels = args.out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    print(f"fetching {len(pins)} wheels and the TE extension's source into {wheels}", flush=True)
    try:
        substituted = download(pins, wheels, args.python, args.glibc)
    except subprocess.CalledProcessError as e:
        print(f"pip could not fetch {e.cmd[-1]} (its message is above)", file=sys.stderr)
        return 1
    for pin in substituted:
        print(f"no wheel of {pin} for Python {args.python} and glibc {args.glibc}: took the "
              "newest version that has one")
    parts = pack(wheels, args.out / "parts", args.part_mib << 20)
    total = sum(p.stat().st_size for p in parts) / 2**20
    print(f"{len(parts)} parts, {total:.0f} MiB, in {args.out / 'parts'} (with SHA256SUMS); on the "
          "node, with the parts (and SHA256SUMS) copied to a folder: tools/gpu_install.sh FOLDER")
    return 0


if __name__ == "__main__":
    sys.exit(main())
