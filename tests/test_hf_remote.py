"""`convert to-hf` of X, H, tiled D and pixel-shuffled D: the remote-code NVLMForConditionalGeneration
written into the export, loaded by transformers with trust_remote_code=True, logits equal to ours
(text only, one image, several images / tiled images), Mllama's gate names, an exact round trip
through `from-hf`, and `generate` with its cache equal to full forward passes."""
import json

import pytest
import torch
from hf_helpers import design_config, random_checkpoint, write_dataset_tokenizer
from safetensors import safe_open

from mmpretrain.hf import ConversionError, local
from mmpretrain.hf.cases import TEXTS
from mmpretrain.hf.export import export
from mmpretrain.hf.import_ import import_hf
from mmpretrain.hf.mapping import model_tensors
from mmpretrain.hf.verify import compare, design_cases, load_hf, pixel_batch, verify

VARIANTS = {"x": ("x", False, 1), "h": ("h", True, 1), "d_tiles": ("d", True, 1),
            "d_merge2": ("d", False, 2)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmpretrain.parallel import init_distributed

    init_distributed(1, 1, None, seed=1234)
    root = tmp_path_factory.mktemp("hf_remote")
    return root, write_dataset_tokenizer(root / "data"), {}


def make(world, name):
    """(variant, config, tokenizer, checkpoint, export dir) of a random tiny model, made once."""
    root, tok, made = world
    if name not in made:
        cfg = design_config(root / "data", *VARIANTS[name])
        ckpt = random_checkpoint(root / name, cfg, tok, seed=3)
        export(ckpt, root / f"hf_{name}", shard_size="40KB")
        made[name] = name, cfg, tok, ckpt, root / f"hf_{name}"
    return made[name]


@pytest.fixture
def exported(world, name):
    """`make`'s variant `name`."""
    return make(world, name)


each_variant = pytest.mark.parametrize("name", list(VARIANTS))


def ours_of(ckpt, tok):
    return local.load_cpu_model(ckpt, local.checkpoint_config(ckpt), tok)


@each_variant
def test_loads_with_remote_code_and_logits_equal_ours(exported):
    from transformers import AutoModelForCausalLM

    name, cfg, tok, ckpt, out = exported
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "nvlm" and conf["design"] == cfg.model.design
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_nvlm.NVLMForConditionalGeneration"
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == "NVLMForConditionalGeneration"
    diffs = compare(ours_of(ckpt, tok), hf, tok, cfg.vision.patch_size, cfg)
    assert set(diffs) == {"text only", "one image", "several images"}
    assert max(diffs.values()) < 1e-4, diffs  # observed ~1e-6


@each_variant
def test_images_reach_the_logits_only_after_their_anchor(exported):
    """Other pixels change the logits from the first image token on, never before it."""
    _, cfg, tok, _, out = exported
    hf, p = load_hf(out), cfg.vision.patch_size
    case = design_cases(cfg, tok, hf.config.vision_config.image_size // p)[2]
    pixels, sizes = pixel_batch(case.images, p)
    tiles = torch.tensor([i.tile for i in case.images])
    with torch.no_grad():
        a, b = (hf(input_ids=torch.tensor([case.ids]), pixel_values=x, image_sizes=sizes,
                   image_tiles=tiles).logits[0] for x in (pixels, pixels.flip(0) + 0.5))
    first = min(case.anchors)
    assert torch.equal(a[:first], b[:first])
    assert (a[first + 1:] - b[first + 1:]).abs().amax(-1).min() > 1e-3  # every later token


@each_variant
def test_round_trip_is_exact(exported, tmp_path):
    _, cfg, tok, ckpt, out = exported
    back = import_hf(out, tmp_path / "back", local.checkpoint_config(ckpt))
    a, b = model_tensors(ours_of(ckpt, tok).state_dict()), model_tensors(ours_of(back, tok).state_dict())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@each_variant
def test_export_files(exported):
    name, _, _, _, out = exported
    for f in ("configuration_nvlm.py", "nvlm_layers.py", "modeling_nvlm.py", "processing_nvlm.py",
              "nvlm_pixels.py", "nvlm_resize.py", "nvlm_tiling.py", "tokenizer.json", "processor_config.json",
              "generation_config.json", "model.safetensors.index.json"):
        assert (out / f).is_file(), f


@pytest.mark.parametrize("name", ["x"])
def test_x_gates_have_mllama_names(exported):
    _, _, tok, ckpt, out = exported
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = "language_model.model.cross_attention_layers.1."  # before decoder layer 2 (1-based)
    ours = ours_of(ckpt, tok).language_model.cross_attention_2
    for gate in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
        with safe_open(str(out / index[prefix + gate]), "pt") as f:
            assert torch.equal(f.get_tensor(prefix + gate), getattr(ours, gate).detach())
    assert {k[len(prefix):] for k in index if k.startswith(prefix)} == {
        "input_layernorm.weight", "cross_attn.q_proj.weight", "cross_attn.k_proj.weight",
        "cross_attn.v_proj.weight", "cross_attn.o_proj.weight", "cross_attn.q_norm.weight",
        "cross_attn.k_norm.weight", "cross_attn_attn_gate",
        "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "cross_attn_mlp_gate"}
    assert not any(k.startswith("language_model.model.cross_attention_layers.0.") for k in index)


@pytest.mark.parametrize("name", ["x", "h"])
def test_generate_with_cache_equals_full_forward(exported):
    """The image context outlives the prompt: cached greedy steps give the logits of whole passes."""
    _, cfg, tok, _, out = exported
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    p = cfg.vision.patch_size
    case = design_cases(cfg, tok, hf.config.vision_config.image_size // p)[2]
    pixels, sizes = pixel_batch(case.images, p)
    images = dict(pixel_values=pixels, image_sizes=sizes,
                  image_tiles=torch.tensor([i.tile for i in case.images]))
    ids = torch.tensor([case.ids[:-1]])
    gen = hf.generate(input_ids=ids, **images, max_new_tokens=4, return_dict_in_generate=True,
                      output_logits=True)
    full = gen.sequences
    with torch.no_grad():
        logits = hf(input_ids=full[:, :-1], **images).logits[0, ids.shape[1] - 1:]
    torch.testing.assert_close(torch.cat(gen.logits), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["x"])
def test_verify_runs_only_the_code_it_wrote(exported, tmp_path):
    import shutil

    out = exported[-1]
    shutil.copytree(out, tmp_path / "hf")
    with open(tmp_path / "hf" / "modeling_nvlm.py", "a") as f:
        f.write("\nprint('not ours')\n")
    with pytest.raises(ConversionError, match="modeling_nvlm.py"):
        load_hf(tmp_path / "hf")


@each_variant
def test_verify_checks_the_processor_against_training(exported, tmp_path, capsys):
    import shutil

    from mmpretrain.hf import VerificationError

    _, _, _, ckpt, out = exported
    verify(ckpt, out)
    assert "verify: processor       token ids and pixels equal" in capsys.readouterr().out
    shutil.copytree(out, tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "processor_config.json").read_text())
    key = "tile_size" if conf["resize"] == "tiles" else "token_budget"
    conf[key] //= 2  # a hand edit the model was not trained with
    (tmp_path / "hf" / "processor_config.json").write_text(json.dumps(conf))
    with pytest.raises(VerificationError, match="processor differs from training on .*pixel_values"):
        verify(ckpt, tmp_path / "hf")


@pytest.mark.parametrize("name", ["x"])
def test_verify_refuses_the_export_of_another_design(exported, world):
    """An X checkpoint against a pixel-shuffled D export: refused before any weights load."""
    with pytest.raises(ConversionError, match="design is 'd' there, 'x' for the checkpoint"):
        verify(exported[3], make(world, "d_merge2")[4])


def test_cli_to_hf_of_x_verifies(world, tmp_path, capsys):
    from mmpretrain.cli import main

    root, tok, _ = world
    ckpt = random_checkpoint(tmp_path / "run", design_config(root / "data", "x"), tok, seed=5)
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf"), "--tol", "1e-4"]) == 0
    printed = capsys.readouterr().out
    assert "verify: several images" in printed and "verify: ok" in printed


@pytest.mark.parametrize("name", ["x", "h"])
def test_a_batch_of_rows_equals_each_row_alone(exported):
    """Images are routed to their own row: two right-padded rows give each row's own logits."""
    _, cfg, tok, _, out = exported
    hf, p = load_hf(out), cfg.vision.patch_size
    cases = design_cases(cfg, tok, hf.config.vision_config.image_size // p)[1:]
    width = max(len(c.ids) for c in cases)
    ids = torch.tensor([c.ids + [tok.pad_id] * (width - len(c.ids)) for c in cases])

    def inputs(images):
        pixels, sizes = pixel_batch(images, p)
        return dict(pixel_values=pixels, image_sizes=sizes,
                    image_tiles=torch.tensor([i.tile for i in images]))

    with torch.no_grad():
        both = hf(input_ids=ids, **inputs(cases[0].images + cases[1].images)).logits
        for row, c in enumerate(cases):
            alone = hf(input_ids=torch.tensor([c.ids]), **inputs(c.images)).logits[0]
            torch.testing.assert_close(both[row, :len(c.ids)], alone, atol=1e-5, rtol=0)


@each_variant
def test_sequences_generated_per_prompt_keep_their_rows_images(exported):
    """generate(num_return_sequences=k) repeats each row k times: its images go with it (as a
    group, where transformers would repeat image by image and shift them across rows)."""
    _, cfg, tok, _, out = exported
    hf, p = load_hf(out), cfg.vision.patch_size
    cases = design_cases(cfg, tok, hf.config.vision_config.image_size // p)[1:]
    assert max(len(c.images) for c in cases) > 1  # a row with several images (or tiles)
    width = max(len(c.ids) for c in cases)
    ids = torch.tensor([c.ids + [tok.pad_id] * (width - len(c.ids)) for c in cases])
    images = [i for c in cases for i in c.images]
    pixels, sizes = pixel_batch(images, p)
    inputs = dict(pixel_values=pixels, image_sizes=sizes, image_tiles=torch.tensor([i.tile for i in images]))
    expanded_ids, expanded = hf._expand_inputs_for_generation(expand_size=3, input_ids=ids, **inputs)
    assert expanded_ids.shape[0] == 3 * len(cases)
    with torch.no_grad():
        logits = hf(input_ids=expanded_ids, **expanded).logits
        for row, c in enumerate(cases):
            one = pixel_batch(c.images, p)
            alone = hf(input_ids=torch.tensor([c.ids]), pixel_values=one[0], image_sizes=one[1],
                       image_tiles=torch.tensor([i.tile for i in c.images])).logits[0]
            for copy in range(3):
                torch.testing.assert_close(logits[3 * row + copy, :len(c.ids)], alone, atol=1e-5, rtol=0)
    sampled = hf.generate(input_ids=ids, attention_mask=(ids != tok.pad_id).long(), **inputs,
                          do_sample=True, num_return_sequences=2, max_new_tokens=2)
    assert sampled.shape == (2 * len(cases), width + 2)


def raw_sample():
    """Two images between three texts, as a shard sample (encoded bytes) and as processor inputs
    (text, the same files opened by Pillow): a JPEG turned by its EXIF orientation and a PNG with
    transparency, which training reads upright and over white."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    turned, clear = io.BytesIO(), io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: 30 x 45 stored, 45 x 30 upright
    Image.fromarray(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)).save(turned, "JPEG", exif=exif)
    Image.fromarray(rng.integers(0, 255, (50, 20, 4), dtype=np.uint8)).save(clear, "PNG")
    encoded = [turned.getvalue(), clear.getvalue()]
    t = TEXTS
    sample = {"images": encoded, "segments": [{"text": t[2]}, {"image": 0}, {"text": t[0]},
                                              {"image": 1}, {"text": t[1]}]}
    return sample, f"{t[2]}<image>{t[0]}<image>{t[1]}", [Image.open(io.BytesIO(b)) for b in encoded]


@each_variant
def test_the_processor_gives_the_inputs_training_builds(exported):
    """AutoProcessor on raw images: the token ids and pixels the training data path builds for the
    same sample (its resize, tiles and layout), and the logits our model gives on them."""
    from mmpretrain.data.images import ImagePatches, ImagePreparer
    from mmpretrain.data.resize import normalize
    from mmpretrain.data.sequence import build_sequence
    from transformers import AutoProcessor

    from mmpretrain.dataset import image_settings
    from mmpretrain.hf.verify import Case, our_logits

    name, cfg, tok, ckpt, out = exported
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(processor).__name__ == "NVLMProcessor"
    sample, text, images = raw_sample()
    settings = image_settings(cfg)
    settings.decoder = "pillow"
    seq = build_sequence(sample, tok, ImagePreparer(settings), cfg.projector.merge, cfg.model.design)
    trained = [ImagePatches(normalize(i.patches), i.rows, i.cols, i.tile) for i in seq.images]
    inputs = processor(text=text, images=images, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == seq.ids[:-1]  # training's sample ends with </s>
    pixels, sizes = pixel_batch(trained, cfg.vision.patch_size)
    assert torch.equal(inputs["pixel_values"], pixels) and torch.equal(inputs["image_sizes"], sizes)
    assert inputs["image_tiles"].tolist() == [i.tile for i in seq.images]
    assert len(seq.images) > 2 if cfg.data.resize == "tiles" else len(seq.images) == 2
    ours = our_logits(ours_of(ckpt, tok), Case(name, seq.ids[:-1], trained, seq.anchors[:len(trained)]),
                      tok.pad_id)
    with torch.no_grad():
        theirs = load_hf(out)(**inputs).logits[0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["h"])
def test_the_export_processes_images_without_mmpretrain(exported, tmp_path):
    """The export's processor runs on its own shipped files: in a process where `import
    mmpretrain` fails, it gives the inputs it gives here."""
    import subprocess
    import sys

    from transformers import AutoProcessor

    _, _, _, _, out = exported
    sample, text, images = raw_sample()
    names = [str(tmp_path / f"{i}.img") for i in range(len(images))]
    for name, data in zip(names, sample["images"]):
        open(name, "wb").write(data)
    here = AutoProcessor.from_pretrained(out, trust_remote_code=True)(text=text, images=images,
                                                                      return_tensors="pt")
    code = f"""
import sys, torch
sys.modules["mmpretrain"] = None  # any import of it raises ImportError
from PIL import Image
from transformers import AutoProcessor
p = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
torch.save(dict(p(text={text!r}, images=[Image.open(n) for n in {names!r}], return_tensors="pt")),
           {str(tmp_path / "there.pt")!r})
"""
    env = {"OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    there = torch.load(tmp_path / "there.pt")
    assert set(there) == set(here)
    for key, value in here.items():
        assert torch.equal(there[key], value), key


@pytest.mark.parametrize("name", ["x", "h"])
def test_the_processor_batches_generates_and_names_a_miscount(exported):
    _, cfg, tok, _, out = exported
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    _, text, images = raw_sample()
    alone = [processor(text=t, images=i)["input_ids"][0] for t, i in
             ((text, images), ("<image>question: what color is it? answer:", images[:1]))]
    texts = [text, "<image>question: what color is it? answer:"]
    flat = processor(text=texts, images=images + images[:1])
    nested = processor(text=texts, images=[images, images[:1]], return_tensors="pt")
    assert flat["input_ids"] == nested["input_ids"].tolist()
    for row, ids in enumerate(alone):
        assert flat["input_ids"][row][:len(ids)] == ids
        assert flat["input_ids"][row][len(ids):] == [tok.pad_id] * (len(flat["input_ids"][row]) - len(ids))
        assert sum(flat["attention_mask"][row]) == len(ids)
    assert nested["pixel_values"].shape[0] == len(processor(text=text, images=images)["image_tiles"]) + \
        len(processor(text=texts[1], images=images[:1])["image_tiles"])
    inputs = processor(text=text, images=images, return_tensors="pt")
    out_ids = load_hf(out).generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out_ids.shape == (1, inputs["input_ids"].shape[1] + 3)
    from transformers import pipeline  # transformers' own pipeline finds processor and model

    pipe = pipeline("image-text-to-text", model=str(out), trust_remote_code=True)
    one = "<image>question: what color is it? answer:"  # the JPEG: the pipeline drops alpha itself
    (answer,) = pipe(images=images[:1], text=one, max_new_tokens=3, return_tensors=True)
    alone = processor(text=one, images=images[:1], return_tensors="pt")
    want = load_hf(out).generate(**alone, max_new_tokens=3, do_sample=False)[0].tolist()
    assert [int(t) for t in answer["generated_token_ids"]] == want
    with pytest.raises(ValueError, match="2 <image> in the text for 1 images"):
        processor(text=text, images=images[:1])


def test_llava_into_an_x_job_keeps_fresh_cross_attention(world, tmp_path):
    from hf_helpers import save_llava

    root, tok, _ = world
    cfg = design_config(root / "data", "x")
    save_llava(tmp_path / "llava", cfg, tok)
    ckpt = import_hf(tmp_path / "llava", tmp_path / "run", cfg)
    gate = ours_of(ckpt, tok).language_model.cross_attention_2.cross_attn_attn_gate
    assert torch.equal(gate.detach(), torch.zeros(1))  # the job's fresh initialisation
