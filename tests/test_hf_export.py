"""`convert to-hf`: a tiny checkpoint -> LlavaForConditionalGeneration, loaded by transformers,
with logits equal to ours (text only, one image, several images), and `generate` through the
exported processor."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_helpers import random_checkpoint, tiny_config, write_dataset_tokenizer
from safetensors import safe_open

from mmpretrain.hf import ConversionError, local
from mmpretrain.hf.export import export
from mmpretrain.hf.verify import compare, load_hf, verify


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
