"""The offline GPU bundle (tools/gpu_bundle.py, tools/gpu_install.sh), without a network: what it
leaves out, and parts that arrive over several copies, one of them damaged, installed once."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "tools" / "gpu_bundle.py")
gpu_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_bundle)


def test_bundle_leaves_out_what_the_node_has_and_dev_tools(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("# pins\nPyYAML==6.0.3\nmegatron-core==0.16.1\nruff==0.1\nmosaicml_streaming==0.13.0\n"
                    "zipp==4.1.2\n")
    node = tmp_path / "node.txt"
    node.write_text("# the node's\npyyaml==6.0.1\nMosaicML-Streaming\ntorch @ file:///x\n")
    pins = gpu_bundle.wanted(lock, gpu_bundle.read_names(node))
    assert pins[0] == "megatron-core==0.16.1"
    names = {gpu_bundle.normalise(p.split("==")[0]) for p in pins}
    assert not names & {"pyyaml", "mosaicml-streaming", "ruff", "torch"}
    assert {"transformer-engine-cu13", "pydantic"} <= names
    assert sum(p.startswith("zipp==") for p in pins) == 1  # in the lock and in TE's list: once


def wheel(dest: Path, name: str, payload: bytes = b"") -> None:
    """A minimal pure-Python wheel holding module `<name>_mod`."""
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(dest / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}_mod/__init__.py", f"VALUE = {len(payload)}\n# {payload.hex()}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{name}_mod/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n"
                                     f"{info}/RECORD,,\n")


def install(parts: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MMPRETRAIN_SITE=str(tmp_path / "site"),
               MMPRETRAIN_STASH=str(tmp_path / "stash"), PYTHON=sys.executable)
    return subprocess.run([str(ROOT / "tools" / "gpu_install.sh"), str(parts)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_parts_arrive_over_several_copies_and_install_once(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel(wheels, "probe_a", os.urandom(30_000))  # random bytes do not compress: several parts
    wheel(wheels, "probe_b", b"b")
    parts = gpu_bundle.pack(wheels, tmp_path / "parts", 16_000)
    assert len(parts) >= 3
    sums = (tmp_path / "parts" / "SHA256SUMS").read_text()
    assert len(sums.splitlines()) == len(parts) + 1 and "bundle.tar\n" in sums

    # Copy k carries SHA256SUMS and part k only; the first part arrives damaged.
    copies = []
    for i, part in enumerate(parts):
        copy = tmp_path / f"copy{i}"
        copy.mkdir()
        shutil.copy(tmp_path / "parts" / "SHA256SUMS", copy)
        shutil.copy(part, copy)
        copies.append(copy)
    damaged = copies[0] / parts[0].name
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])

    for i, copy in enumerate(copies):
        r = install(copy, tmp_path)
        assert r.returncode == 3, r.stderr
        assert f"have {i} of {len(parts)} parts" in r.stderr  # the damaged first part is not counted
    assert "does not match SHA256SUMS: dropped" in install(copies[0], tmp_path).stderr

    shutil.copy(parts[0], copies[0])  # the first part again, intact
    r = install(copies[0], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "joining, installing" in r.stderr and "2 distributions" in r.stdout
    out = subprocess.run([sys.executable, "-c", "import probe_a_mod, probe_b_mod; "
                          "print(probe_a_mod.VALUE, probe_b_mod.VALUE)"],
                         env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["30000", "1"]

    again = install(tmp_path / "nothing-new", tmp_path)  # the stash is complete: nothing to redo
    assert again.returncode == 0 and "joining" not in again.stderr
