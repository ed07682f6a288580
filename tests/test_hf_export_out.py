"""`convert to-hf` and its OUT: a previous export replaced whole, left intact by an export that
fails (or fails verification), an OUT it cannot own refused before the checkpoint is read, what a
killed export left cleaned up; and the checkpoint read one output shard at a time."""
import json
import os
from pathlib import Path

import pytest
import torch
from hf_helpers import random_checkpoint
from safetensors import safe_open

from mmpretrain.hf import ConversionError, local
from mmpretrain.hf.export import export


def test_export_replaces_a_previous_export_whole(tiny, tmp_path):
    """An X export over a D export: none of D's files (processor, shards) are left behind."""
    import shutil

    from hf_helpers import design_config

    cfg, tok, _, d_export = tiny
    shutil.copytree(d_export, tmp_path / "hf")
    x = random_checkpoint(tmp_path / "x", design_config(Path(cfg.data.path), "x"), tok, seed=4)
    export(x, tmp_path / "hf")
    names = {f.name for f in (tmp_path / "hf").iterdir()}
    assert "preprocessor_config.json" not in names  # D's PixtralImageProcessor
    processor = json.loads((tmp_path / "hf" / "processor_config.json").read_text())
    assert processor["processor_class"] == "NVLMProcessor" and processor["design"] == "x"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert {n for n in names if n.endswith(".safetensors")} == set(index.values())
    assert sorted(f.name for f in tmp_path.iterdir()) == ["hf", "x"]  # no temporary left


def test_a_failed_export_leaves_the_previous_one_intact(tiny, tmp_path, monkeypatch):
    import shutil

    import mmpretrain.hf.export as export_module

    _, _, ckpt, d_export = tiny
    shutil.copytree(d_export, tmp_path / "hf")
    before = {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()}

    def crash(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "write_text_files", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export(ckpt, tmp_path / "hf", dtype="bf16")  # shards other than the ones there
    assert {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()} == before
    assert [f.name for f in tmp_path.iterdir()] == ["hf"]


def test_an_export_that_fails_verification_leaves_the_previous_one(tiny, tmp_path, monkeypatch,
                                                                    capsys):
    """to-hf verifies the new export before it replaces OUT: one that fails (here: a weight the
    writer got wrong) is never put in place, and no temporary is left."""
    import shutil

    import mmpretrain.hf.export as export_module
    from mmpretrain.cli import main

    _, _, ckpt, d_export = tiny
    shutil.copytree(d_export, tmp_path / "hf")
    before = {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()}
    save = export_module.save_shard

    def wrong(path, tensors):
        tensors = dict(tensors)
        if "vision_tower.ln_pre.weight" in tensors:
            tensors["vision_tower.ln_pre.weight"] = tensors["vision_tower.ln_pre.weight"] + 0.5
        save(path, tensors)

    monkeypatch.setattr(export_module, "save_shard", wrong)
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf"), "--tol", "1e-4"]) == 1
    assert "verification failed" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in (tmp_path / "hf").iterdir()} == before
    assert [f.name for f in tmp_path.iterdir()] == ["hf"]
    monkeypatch.setattr(export_module, "save_shard", save)
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "new"), "--tol", "1e-4"]) == 0
    assert "verify: ok" in capsys.readouterr().out


def test_export_refuses_an_out_it_cannot_own_before_loading(tiny, tmp_path, monkeypatch, capsys):
    from mmpretrain.cli import main
    from mmpretrain.hf.export import check_out

    _, _, ckpt, _ = tiny
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "hub").mkdir()  # a model from elsewhere: not ours to replace
    (tmp_path / "hub" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty")
    check_out(tmp_path / "new" / "hf")

    def no_load(*args):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(local, "load_cpu_model", no_load)
    monkeypatch.setattr(local, "meta_model", no_load)
    for out, match in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "hf", "is a file"),
                       (tmp_path / "other", "holds other files"),
                       (tmp_path / "hub", "holds other files"),
                       (Path("/proc/mmpretrain-out"), "cannot write there")):
        with pytest.raises(ConversionError, match=match):
            export(ckpt, out)
        assert main(["convert", "to-hf", str(ckpt), str(out)]) == 2
        assert match in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "hub" / "config.json").read_text() == "{}"


def test_an_export_cleans_up_after_one_that_was_killed(tiny, tmp_path):
    """A killed export leaves `.OUT.tmp-PID` (half written: deleted by the next export) and, killed
    between its two renames, the previous export as `.OUT.old-PID` with OUT missing (put back);
    what a running process has there is left alone."""
    import shutil
    import subprocess

    from mmpretrain.hf.export import clear_stale

    _, _, ckpt, d_export = tiny
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "hf"
    shutil.copytree(d_export, tmp_path / f".hf.old-{dead.pid}")
    (tmp_path / f".hf.tmp-{dead.pid}").mkdir()
    (tmp_path / f".hf.tmp-{os.getpid()}-x").mkdir()  # not an export's name
    (tmp_path / f".hf.tmp-{os.getppid()}").mkdir()  # a running process's
    clear_stale(out)
    assert (out / "mmpretrain.json").is_file()  # the previous export, back in place
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["hf", f".hf.tmp-{os.getpid()}-x", f".hf.tmp-{os.getppid()}"])
    (tmp_path / f".hf.tmp-{dead.pid}").mkdir()
    (tmp_path / f".hf.tmp-{dead.pid}" / "model-00001-of-00002.safetensors").write_bytes(b"x" * 99)
    export(ckpt, out)
    assert not (tmp_path / f".hf.tmp-{dead.pid}").exists() and (out / "mmpretrain.json").is_file()


def test_the_export_reads_the_checkpoint_a_shard_at_a_time(tiny, tmp_path, monkeypatch):
    """Without verification the model is never loaded whole: each output shard's tensors are read
    alone, every tensor once, and the shards hold exactly what a full load gives."""
    from mmpretrain.checkpoint import CheckpointSlices

    _, tok, ckpt, _ = tiny
    reads, real = [], CheckpointSlices.read

    def spy(self, request):
        got = real(self, request)
        reads.append({n: t.numel() * t.element_size() for n, t in got.items()})
        return got

    def no_load(*args):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(CheckpointSlices, "read", spy)
    monkeypatch.setattr(local, "load_cpu_model", no_load)
    export(ckpt, tmp_path / "hf", shard_size="40KB")
    monkeypatch.undo()
    full = local.load_cpu_model(ckpt, local.checkpoint_config(ckpt), tok).state_dict()
    model_bytes = {n: t.numel() * t.element_size() for n, t in full.items() if not n.endswith("_extra_state")}
    names = [n for r in reads for n in r]
    assert sorted(names) == sorted(model_bytes)  # every tensor read once
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(reads) == len(shards) > 3
    assert max(sum(r.values()) for r in reads) < sum(model_bytes.values()) / 3
    for s in shards:
        with safe_open(str(tmp_path / "hf" / s), "pt") as f, safe_open(
                str(tiny[3] / s), "pt") as g:  # the module's export (verified against transformers)
            assert set(f.keys()) == set(g.keys())
            assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
