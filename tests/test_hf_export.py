"""`convert to-hf`: a tiny checkpoint -> LlavaForConditionalGeneration, loaded by transformers,
with logits equal to ours (text only, one image, several images), and `generate` through the
exported processor."""
import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_helpers import random_checkpoint, tiny_config, write_dataset_tokenizer
from safetensors import safe_open

from mmpretrain.hf import ConversionError, local
from mmpretrain.hf.export import export
from mmpretrain.hf.verify import compare, load_hf, verify


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, tokenizer, checkpoint, export dir) of a random tiny D model."""
    from mmpretrain.parallel import init_distributed

    init_distributed(1, 1, None, seed=1234)
    root = tmp_path_factory.mktemp("hf_export")
    tok = write_dataset_tokenizer(root / "data")
    cfg = tiny_config(root / "data")
    ckpt = random_checkpoint(root / "run", cfg, tok)
    export(root / "run", root / "hf", shard_size="40KB")
    return cfg, tok, ckpt, root / "hf"


def test_export_files(tiny):
    cfg, tok, _, out = tiny
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["LlavaForConditionalGeneration"]
    assert conf["vision_config"]["model_type"] == "pixtral" and conf["text_config"]["model_type"] == "llama"
    assert conf["image_token_index"] == tok.img_id
    assert conf["vision_feature_layer"] == -1 and conf["vision_feature_select_strategy"] == "full"
    assert conf["text_config"]["vocab_size"] == 384  # 300 tokens padded to a multiple of 128
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            assert {k for k, v in index.items() if v == s} == set(f.keys())
    assert "vision_tower.transformer.layers.1.attention.q_proj.weight" in index
    assert "language_model.lm_head.weight" in index
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "processor_config.json"):
        assert (out / name).is_file(), name


def test_logits_equal_ours(tiny):
    cfg, tok, ckpt, out = tiny
    ours = local.load_cpu_model(ckpt, local.checkpoint_config(ckpt), tok)
    diffs = compare(ours, load_hf(out), tok, cfg.vision.patch_size)
    assert set(diffs) == {"text only", "one image", "several images"}
    assert max(diffs.values()) < 1e-4, diffs


def test_thin_images_get_hf_vision_features_equal_ours(tiny):
    """Training makes grids up to the whole token budget along one side (a strip one patch
    high): HF's RoPE table covers them, so the exported tower computes our features."""
    from mmpretrain.data.packing import pack_rows
    from mmpretrain.data.resize import native_size
    from mmpretrain.data.sequence import TokenSequence
    from mmpretrain.parallel import cuda_to_cpu

    from mmpretrain.hf.verify import pixel_batch, random_image

    cfg, tok, ckpt, out = tiny
    p, budget = cfg.vision.patch_size, cfg.data.image_token_budget
    wide, tall = native_size(7, 1000, p, budget), native_size(1000, 7, p, budget)
    assert wide == (p, budget * p) and tall == (budget * p, p)
    ours, hf = local.load_cpu_model(ckpt, local.checkpoint_config(ckpt), tok), load_hf(out)
    for seed, (h, w) in enumerate((wide, tall, native_size(9, 330, p, budget))):
        image = random_image(h // p, w // p, p, seed)
        batch = pack_rows([[TokenSequence([0], [False], [image])]], 1, 0)
        pixels, sizes = pixel_batch([image], p)
        with torch.no_grad(), cuda_to_cpu():
            a = ours.vision(batch.patches, batch.patch_positions, batch.image_sizes)
            b = hf.vision_tower(pixels, image_sizes=sizes).last_hidden_state[0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_export_verifies(tiny, tmp_path):
    cfg, tok, ckpt, _ = tiny
    export(ckpt, tmp_path / "bf16", dtype="bf16")
    with safe_open(str(tmp_path / "bf16" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_tensor("language_model.lm_head.weight").dtype == torch.bfloat16
    assert max(verify(ckpt, tmp_path / "bf16", tol=1e-4).values()) < 1e-4


def test_generate_through_the_processor(tiny):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, tok, _, out = tiny
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 45, 3), dtype=np.uint8))
    inputs = processor(text="[IMG]question: what color is the star? answer:", images=image,
                       return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == tok.bos_id and ids.count(tok.img_end_id) == 1
    assert ids.count(tok.img_id) == (inputs["image_sizes"][0] // 4).prod()
    generated = model.generate(**inputs, max_new_tokens=4)[0, len(ids):]
    assert len(generated) > 0 and int(generated.max()) < tok.vocab_size  # padding ids suppressed
    assert isinstance(processor.decode(generated, skip_special_tokens=True), str)


def test_processor_pixels_equal_ours_at_the_same_size(tiny):
    """At a size our resize keeps, the exported processor gives the pixels our pipeline gives."""
    import io

    from mmpretrain.data.images import ImagePatches, prepare
    from mmpretrain.data.packing import pack_rows
    from mmpretrain.data.sequence import TokenSequence
    from PIL import Image
    from transformers import AutoProcessor

    from mmpretrain.hf.verify import pixel_batch

    cfg, _, _, out = tiny
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    png = io.BytesIO()
    image.save(png, format="PNG")
    ours = prepare(png.getvalue(), cfg.vision.patch_size, cfg.data.image_token_budget, max_upscale=1.0)
    assert (ours.rows, ours.cols) == (6, 8)
    stream = pack_rows([[TokenSequence([0], [False], [ours])]], 1, 0).patches  # as the encoder reads
    hf = AutoProcessor.from_pretrained(out)(text="[IMG]", images=image, return_tensors="pt")
    pixels, sizes = pixel_batch([ImagePatches(stream, ours.rows, ours.cols)], cfg.vision.patch_size)
    assert torch.equal(hf["image_sizes"], sizes)
    torch.testing.assert_close(hf["pixel_values"], pixels, atol=1e-5, rtol=0)


def test_cli_to_hf_verifies_and_fails_on_a_wrong_weight(tiny, tmp_path, capsys):
    from safetensors.torch import save_file

    from mmpretrain.cli import main

    _, _, ckpt, _ = tiny
    assert main(["convert", "to-hf", str(ckpt.parent.parent), str(tmp_path / "hf"),
                 "--tol", "1e-4"]) == 0
    assert "verify: ok" in capsys.readouterr().out
    shard = tmp_path / "hf" / "model-00001-of-00001.safetensors"
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["vision_tower.ln_pre.weight"] += 0.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert main(["convert", "verify", str(ckpt), str(tmp_path / "hf")]) == 1
    assert "verification failed" in capsys.readouterr().err


def test_verify_against_another_checkpoints_export_names_its_source(tiny, tmp_path, capsys):
    from mmpretrain.cli import main

    cfg, tok, ckpt, d_export = tiny
    other = random_checkpoint(tmp_path / "other", cfg, tok, seed=9)
    assert main(["convert", "verify", str(other), str(d_export)]) == 1
    err = capsys.readouterr().err
    assert f"{d_export} was exported from {ckpt.resolve()}, not {other}" in err, err


def _llama_config(cfg, tok, out):
    from mmpretrain.hf.configs import llama_config

    llama_config(cfg, 384, tok).save_pretrained(out)


def _x_export_config(cfg, tok, out):
    from hf_helpers import design_config

    from mmpretrain.hf.remote import nvlm_config

    nvlm_config(design_config(Path(cfg.data.path), "x"), 384, tok, "float32").save_pretrained(out)


def _deeper_llava_config(cfg, tok, out):
    from mmpretrain.hf.configs import llava_config

    deeper = copy.deepcopy(cfg)
    deeper.decoder.num_layers = 3
    llava_config(deeper, 384, tok, "float32").save_pretrained(out)


@pytest.mark.parametrize("write, match", [
    (_llama_config, "model_type is 'llama' there, 'llava' for the checkpoint"),
    (_x_export_config, "model_type is 'nvlm' there, 'llava' for the checkpoint"),
    (_deeper_llava_config, "text_config.num_hidden_layers is 3 there, 2 for the checkpoint"),
])
def test_verify_refuses_a_directory_that_is_not_the_checkpoints_export(tiny, tmp_path, write, match,
                                                                      capsys):
    """config.json is compared with what the exporter writes for the checkpoint before any
    weights load (the directories here hold a config alone)."""
    from mmpretrain.cli import main

    cfg, tok, ckpt, _ = tiny
    write(cfg, tok, tmp_path / "hf")
    with pytest.raises(ConversionError, match=match):
        verify(ckpt, tmp_path / "hf")
    assert main(["convert", "verify", str(ckpt), str(tmp_path / "hf")]) == 2
    assert "is not an export of" in capsys.readouterr().err


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


def test_the_checkpoint_keeps_its_tokenizer_for_the_export(tiny, tmp_path, capsys):
    """A checkpoint holds a copy of its tokenizer: the export uses it when data.path's is gone,
    and refuses a --tokenizer that gives its tokens other ids (the weights would read them as
    other tokens)."""
    import shutil

    from hf_helpers import design_config

    from mmpretrain.cli import main

    cfg, tok, _, _ = tiny
    data = tmp_path / "data"
    shutil.copytree(Path(cfg.data.path), data)
    ckpt = random_checkpoint(tmp_path / "run", design_config(data, "d"), tok, seed=5)
    assert (ckpt / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    other = write_dataset_tokenizer(tmp_path / "other", vocab_size=320)
    assert local.id_changes(tok.tokenizer, other.tokenizer) > 0
    with pytest.raises(ConversionError, match=r"of the tokens of .*tokenizer.json \(the tokenizer "
                                              r"the checkpoint trained with\) have other ids"):
        export(ckpt, tmp_path / "hf", tokenizer=tmp_path / "other")
    shutil.rmtree(data)  # the dataset moved on: the checkpoint's copy is what the export reads
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert "verify: ok" in capsys.readouterr().out
    exported = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]["vocab"]
    assert exported == json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]


def test_export_of_a_checkpoint_trained_at_tp3(tmp_path):
    """TP=3 pads 420 ids to 768 rows (a multiple of lcm(128, 3)), not 512: the export keeps the
    checkpoint's rows and its logits equal ours. The checkpoint holds the global tensors a TP=3
    run saves (heads divisible by 3), written by one process."""
    tok = write_dataset_tokenizer(tmp_path / "data", vocab_size=420)
    cfg = tiny_config(tmp_path / "data")
    cfg.vision.num_attention_heads, cfg.vision.hidden_size = 3, 48
    cfg.decoder.num_attention_heads, cfg.decoder.num_query_groups, cfg.decoder.hidden_size = 6, 3, 96
    cfg.parallel.tp = 3
    ckpt = random_checkpoint(tmp_path / "run", cfg, tok)
    assert local.checkpoint_vocab(ckpt) == 768
    export(ckpt, tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["text_config"]["vocab_size"] == 768
    ours = local.load_cpu_model(ckpt, local.checkpoint_config(ckpt), tok)
    diffs = compare(ours, load_hf(tmp_path / "hf"), tok, cfg.vision.patch_size)
    assert max(diffs.values()) < 1e-4, diffs


def test_cli_errors_name_the_problem(tmp_path, capsys):
    from mmpretrain.cli import main

    assert main(["convert", "to-hf", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope" in capsys.readouterr().err


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
