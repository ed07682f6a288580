"""The offline GPU bundle (tools/gpu_bundle.py, tools/gpu_install.sh), without a network: what it
leaves out; parts that arrive over several copies, one of them damaged, installed once; a newer
bundle replacing an older one; a site that does not import is not marked installed."""
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
    assert gpu_bundle.platforms("2.28")[-1] == "manylinux_2_28_x86_64"
    assert "manylinux_2_29_x86_64" not in gpu_bundle.platforms("2.28")


def wheel(dest: Path, name: str, payload: bytes = b"", version: str = "1.0", module: str = "",
          source: str = "") -> None:
    """A minimal pure-Python wheel of distribution `name` holding module `module` (default
    `<name>_mod`) with `source` (default a VALUE of len(payload))."""
    info = f"{name}-{version}.dist-info"
    module = module or f"{name}_mod"
    source = source or f"VALUE = {len(payload)}\n# {payload.hex()}\n"
    with zipfile.ZipFile(dest / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{module.replace('.', '/')}/__init__.py", source)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{module.replace('.', '/')}/__init__.py,,\n{info}/METADATA,,\n"
                                     f"{info}/WHEEL,,\n{info}/RECORD,,\n")


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
    assert "does not match SHA256SUMS: not taken" in install(copies[0], tmp_path).stderr

    shutil.copy(parts[0], copies[0])  # the first part again, intact
    r = install(copies[0], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "joining, installing" in r.stderr and "2 distributions" in r.stdout
    out = imports(tmp_path, "import probe_a_mod as a, probe_b_mod as b; print(a.VALUE, b.VALUE)")
    assert out.split() == ["30000", "1"]

    again = install(tmp_path / "nothing-new", tmp_path)  # the stash is complete: nothing to redo
    assert again.returncode == 0 and "joining" not in again.stderr


def bundle(tmp_path: Path, name: str, wheels: list[tuple]) -> Path:
    """Parts (and SHA256SUMS) of a bundle of the given wheel() argument tuples, in one folder."""
    src = tmp_path / f"{name}-wheels"
    src.mkdir()
    for args in wheels:
        wheel(src, *args)
    gpu_bundle.pack(src, tmp_path / name, 4_000)
    return tmp_path / name


def imports(tmp_path: Path, code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_newer_bundle_replaces_the_older_and_stale_parts_destroy_nothing(tmp_path):
    old = bundle(tmp_path, "old", [("probe", os.urandom(6_000), "1.0")])
    assert install(old, tmp_path).returncode == 0
    new = bundle(tmp_path, "new", [("probe", os.urandom(9_000), "2.0")])
    first = tmp_path / "first"  # the new SHA256SUMS with its first part, and a stale part of the
    first.mkdir()               # old bundle under the name of the new bundle's second part
    shutil.copy(new / "SHA256SUMS", first)
    shutil.copy(new / "bundle.tar.part00", first)
    shutil.copy(old / "bundle.tar.part01", first / "bundle.tar.part01")
    r = install(first, tmp_path)
    assert r.returncode == 3 and "bundle.tar.part01 does not match SHA256SUMS: not taken" in r.stderr
    n = len(list(new.glob("bundle.tar.part*")))
    assert f"have 1 of {n} parts" in r.stderr
    assert imports(tmp_path, "import probe_mod; print(probe_mod.VALUE)") == "6000"  # old still in use
    r = install(new, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 distributions" in r.stdout  # no dist-info of 1.0 left beside 2.0
    assert imports(tmp_path, "import probe_mod; print(probe_mod.VALUE)") == "9000"


def test_a_site_that_does_not_import_is_not_marked_installed(tmp_path):
    broken = bundle(tmp_path, "broken", [("megatron_core", b"", "0.16.1", "megatron.core",
                                          "raise ImportError('broken on purpose')\n")])
    for _ in range(2):  # each run installs again: nothing was marked installed
        r = install(broken, tmp_path)
        assert r.returncode == 1 and "joining, installing" in r.stderr
        assert "broken on purpose" in r.stderr
    assert not (tmp_path / "site").exists()
