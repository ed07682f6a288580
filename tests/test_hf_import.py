"""`convert from-hf`: tiny HF models made here (LLaVA with a Pixtral tower, Llama, Mistral, a bare
Pixtral tower) -> our checkpoint with equal logits; round trip exact; unsafe and mismatched
inputs refused with errors that name the file, tensor or field."""
import pytest
import torch
from hf_helpers import (
    pixtral_config,
    random_checkpoint,
    randomize,
    save_causal_lm,
    save_llava,
    save_pixtral,
    text_config,
    tiny_config,
    write_dataset_tokenizer,
)

from mmpretrain.config import dump
from mmpretrain.hf import ConversionError, local
from mmpretrain.hf.export import export
from mmpretrain.hf.import_ import import_hf
from mmpretrain.hf.mapping import model_tensors
from mmpretrain.hf.verify import hf_logits, our_logits, sample_cases


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(root dir, config, tokenizer) with megatron initialised as one process."""
    from mmpretrain.parallel import init_distributed

    init_distributed(1, 1, None, seed=1234)
    root = tmp_path_factory.mktemp("hf_import")
    tok = write_dataset_tokenizer(root / "data")
    return root, tiny_config(root / "data"), tok


def imported(ckpt, cfg, tok):
    return local.load_cpu_model(ckpt, local.single_process(cfg), tok)


def max_diff(ours, theirs, tok, cfg, with_images=True) -> float:
    """Max abs logit difference over the sample cases, on the HF model's vocabulary."""
    worst = 0.0
    for case in sample_cases(tok, cfg.vision.patch_size):
        if case.images and not with_images:
            continue
        b = hf_logits(theirs, case, cfg.vision.patch_size)
        a = our_logits(ours, case, tok.pad_id)[:, :b.shape[1]]
        worst = max(worst, (a - b).abs().max().item())
    return worst


def test_llava_with_pixtral_tower(env):
    root, cfg, tok = env
    hf = save_llava(root / "llava", cfg, tok)
    ckpt = import_hf(root / "llava", root / "from_llava", cfg)
    assert ckpt == root / "from_llava" / "checkpoints" / "step_00000000"
    assert (root / "from_llava" / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert max_diff(imported(ckpt, cfg, tok), hf, tok, cfg) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_causal_lm_decoder(env, kind):
    root, cfg, tok = env
    hf = save_causal_lm(root / kind, cfg, kind)
    ckpt = import_hf(root / kind, root / f"from_{kind}", cfg)
    assert max_diff(imported(ckpt, cfg, tok), hf, tok, cfg, with_images=False) < 1e-4


def test_causal_lm_plus_pixtral_tower(env):
    from mmpretrain.data.packing import pack_rows
    from mmpretrain.data.sequence import TokenSequence
    from mmpretrain.parallel import cuda_to_cpu

    from mmpretrain.hf.verify import pixel_batch, random_image

    root, cfg, tok = env
    save_causal_lm(root / "lm", cfg, "llama")
    tower = save_pixtral(root / "pixtral", cfg)
    ckpt = import_hf(root / "lm", root / "from_parts", cfg, vision_tower=root / "pixtral")
    ours = imported(ckpt, cfg, tok)
    images = [random_image(2, 3, 4, 0), random_image(3, 1, 4, 1)]
    batch = pack_rows([[TokenSequence([0], [False], images)]], 1, 0)
    with torch.no_grad(), cuda_to_cpu():
        a = ours.vision(batch.patches, batch.patch_positions, batch.image_sizes)
        pixels, sizes = pixel_batch(images, 4)
        b = tower(pixels, image_sizes=sizes).last_hidden_state[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_round_trip_is_exact(env):
    root, cfg, tok = env
    ckpt = random_checkpoint(root / "source", cfg, tok, seed=7)
    export(ckpt, root / "exported")
    back = import_hf(root / "exported", root / "back", cfg)
    a = model_tensors(imported(ckpt, cfg, tok).state_dict())
    b = model_tensors(imported(back, cfg, tok).state_dict())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_pickle_refused_unless_trusted(env, capsys):
    from mmpretrain.cli import main

    root, cfg, tok = env
    save_causal_lm(root / "pickled", cfg, "llama", safe=False)
    assert list((root / "pickled").glob("*.bin"))
    with pytest.raises(ConversionError, match="--trust-pickle"):
        import_hf(root / "pickled", root / "from_pickle", cfg)
    dump(cfg, root / "job.yaml")
    args = ["convert", "from-hf", str(root / "pickled"), str(root / "from_pickle"),
            "--config", str(root / "job.yaml")]
    assert main(args) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main([*args, "--trust-pickle"]) == 0
    assert (root / "from_pickle" / "checkpoints" / "latest").is_file()


def test_shape_mismatch_names_the_tensor(env):
    root, cfg, tok = env
    save_causal_lm(root / "wide", cfg, "llama", intermediate_size=80)
    with pytest.raises(ConversionError, match=r"layers\.0\.mlp\.gate_proj\.weight: shape \[80, 64\]"):
        import_hf(root / "wide", root / "from_wide", cfg)


@pytest.mark.parametrize("kind, overrides, match", [
    ("llama", {"rope_theta": 10000.0}, "decoder.rope_theta.*rope_theta=10000.0"),
    ("llama", {"num_key_value_heads": 4}, "decoder.num_query_groups.*num_key_value_heads=4"),
    ("mistral", {"sliding_window": 16}, "sliding_window=16"),
])
def test_config_mismatch_names_the_field(env, kind, overrides, match):
    root, cfg, tok = env
    name = "_".join(overrides)
    save_causal_lm(root / name, cfg, kind, **overrides)
    with pytest.raises(ConversionError, match=match):
        import_hf(root / name, root / f"from_{name}", cfg)


def test_llava_feature_layer_before_the_last(env):
    """vision_feature_layer=-2 of a 3-layer tower is our 2-layer encoder (the last layer unused)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    root, cfg, tok = env
    conf = LlavaConfig(vision_config=pixtral_config(cfg, num_hidden_layers=3),
                       text_config=text_config(cfg, vocab=tok.vocab_size), image_token_index=tok.img_id,
                       vision_feature_layer=-2, vision_feature_select_strategy="full")
    hf = LlavaForConditionalGeneration(conf).eval()
    randomize(hf, 5)
    hf.save_pretrained(root / "llava_l2")
    ckpt = import_hf(root / "llava_l2", root / "from_llava_l2", cfg)
    assert max_diff(imported(ckpt, cfg, tok), hf, tok, cfg) < 1e-4


def test_training_starts_from_the_import(env, caplog):
    """`mmpretrain train` on the run directory loads the imported weights with a fresh optimizer,
    and says so."""
    import logging

    from mmpretrain import checkpoint
    from mmpretrain.train.loop import _resume, setup

    root, cfg, tok = env
    run = root / "from_llava"
    if not run.exists():
        save_llava(root / "llava", cfg, tok)
        import_hf(root / "llava", run, cfg)
    parts = setup(cfg)
    chunks, optimizer, scheduler = parts[2], parts[4], parts[5]
    meta = checkpoint.load_training(checkpoint.latest_checkpoint(run), chunks, optimizer, scheduler)
    assert meta["step"] == 0 and meta["loader"] is None and meta["weights_only"]
    want = model_tensors(imported(checkpoint.latest_checkpoint(run), cfg, tok).state_dict())
    for name, value in model_tensors(chunks[0].state_dict()).items():
        assert torch.equal(value, want[name]), name
    with caplog.at_level(logging.INFO, logger="mmpretrain"):
        begun = _resume(cfg, checkpoint.latest_checkpoint(run), chunks, optimizer, scheduler, None)
    assert begun == (0, 0, 0)  # step, samples consumed, skipped in a row
    assert "started from the weights of" in caplog.text and "resumed" not in caplog.text


def test_refuses_a_run_directory_that_has_checkpoints(env, capsys):
    """from-hf starts a new run: a directory holding one is refused, its checkpoint untouched."""
    from mmpretrain.cli import main

    root, cfg, tok = env
    save_causal_lm(root / "lm_for_used", cfg, "llama")
    run = root / "used_run"
    random_checkpoint(run, cfg, tok)
    state = (run / "checkpoints" / "step_00000000" / "state.json").read_text()
    with pytest.raises(ConversionError, match="already holds a run"):
        import_hf(root / "lm_for_used", run, cfg)
    dump(cfg, root / "job.yaml")
    assert main(["convert", "from-hf", str(root / "lm_for_used"), str(run),
                 "--config", str(root / "job.yaml")]) == 2
    assert "pick an empty or new directory" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_00000000" / "state.json").read_text() == state
    (root / "a_file").write_text("x")
    with pytest.raises(ConversionError, match="is a file"):
        import_hf(root / "lm_for_used", root / "a_file" / "run", cfg)


@pytest.mark.parametrize("keep", [1000, -100])
def test_a_truncated_safetensors_file_is_named(env, keep):
    """A file cut in its header (first 1000 bytes kept) or in its data (last 100 bytes lost)."""
    root, cfg, tok = env
    src = root / f"truncated{keep}"
    save_causal_lm(src, cfg, "llama")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(ConversionError, match=r"model\.safetensors: not a readable safetensors"):
        import_hf(src, root / f"from_truncated{keep}", cfg)


def test_rotary_inv_freq_buffers_of_older_conversions_are_ignored(env):
    from safetensors.torch import load_file, save_file

    root, cfg, tok = env
    hf = save_causal_lm(root / "with_inv_freq", cfg, "llama")
    f = root / "with_inv_freq" / "model.safetensors"
    tensors = load_file(str(f))
    for i in range(cfg.decoder.num_layers):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, str(f), metadata={"format": "pt"})
    ckpt = import_hf(root / "with_inv_freq", root / "from_with_inv_freq", cfg)
    assert max_diff(imported(ckpt, cfg, tok), hf, tok, cfg, with_images=False) < 1e-4


def test_import_pads_the_vocabulary_for_the_jobs_tensor_parallel_size(tmp_path):
    """A TP=3 job pads 420 ids to 768 rows (lcm(128, 3)): the imported checkpoint has them, so
    training at TP=3 loads it."""
    tok = write_dataset_tokenizer(tmp_path / "data", vocab_size=420)
    cfg = tiny_config(tmp_path / "data")
    cfg.decoder.num_attention_heads, cfg.decoder.num_query_groups, cfg.decoder.hidden_size = 6, 3, 96
    cfg.parallel.tp = 3
    hf = save_causal_lm(tmp_path / "lm", cfg, "llama", vocab=tok.vocab_size)
    ckpt = import_hf(tmp_path / "lm", tmp_path / "run", cfg)
    assert local.checkpoint_vocab(ckpt) == 768
    assert max_diff(imported(ckpt, cfg, tok), hf, tok, cfg, with_images=False) < 1e-4


def test_an_hf_vocabulary_larger_than_the_jobs_model_is_one_clear_error(tmp_path):
    from mmpretrain.hf import ConversionError

    tok = write_dataset_tokenizer(tmp_path / "data", vocab_size=420)
    cfg = tiny_config(tmp_path / "data")
    save_causal_lm(tmp_path / "lm", cfg, "llama", vocab=1000)
    with pytest.raises(ConversionError, match="the HF embedding has 1000 rows, more than the job's "
                       r"model's 512 \(tokenizer 420 ids\): set decoder.vocab_size to 1000"):
        import_hf(tmp_path / "lm", tmp_path / "run", cfg)
    assert tok.vocab_size == 420 and not (tmp_path / "run" / "checkpoints").exists()
    cfg.decoder.vocab_size = 1000  # as the error says
    assert local.checkpoint_vocab(import_hf(tmp_path / "lm", tmp_path / "run", cfg)) == 1024


def test_the_model_is_never_whole_and_each_hf_tensor_is_read_once(env, monkeypatch):
    """The job's model is only built on the meta device; the checkpoint writer asks for each
    tensor, each HF tensor is read from disk once, and the parts no source provides are built one
    at a time. A save killed before (its temporary directory left) does not block the import."""
    from collections import Counter

    from mmpretrain.hf.shards import WeightReader

    root, cfg, tok = env
    save_llava(root / "llava_once", cfg, tok)
    build, get, reads = local.build_cpu_model, WeightReader.get, Counter()

    def meta_only(*args, meta=False, **kwargs):
        assert meta, "from-hf built the model whole"
        return build(*args, meta=meta, **kwargs)

    def counted(self, name):
        reads[name] += 1
        return get(self, name)

    parts, built = local.build_cpu_parts, []

    def one_part_at_a_time(cfg, rows, prefixes):
        built.append(sorted(prefixes))
        return parts(cfg, rows, prefixes)

    monkeypatch.setattr(local, "build_cpu_model", meta_only)
    monkeypatch.setattr(local, "build_cpu_parts", one_part_at_a_time)
    monkeypatch.setattr(WeightReader, "get", counted)
    (root / "from_llava_once" / "checkpoints" / ".tmp-step_00000000").mkdir(parents=True)  # killed
    import_hf(root / "llava_once", root / "from_llava_once", cfg)
    names = set(WeightReader(root / "llava_once").names())
    assert set(reads) == names and set(reads.values()) == {1}
    # the rows past the HF vocabulary (300 ids, 384 rows): each part built when it is needed
    assert built == [["language_model.embedding"], ["language_model.output_layer"]]


def test_parts_no_source_provides_come_from_the_jobs_seed(env):
    """A causal LM and a tower leave the projector, and the embedding rows beyond the HF
    vocabulary, to their initialisation: the same seed gives the same values, another seed
    others (the rest unchanged), and each is initialised as the whole model initialises it
    (constants equal, spread alike)."""
    import copy

    root, cfg, tok = env
    save_causal_lm(root / "lm_seeded", cfg, "llama")
    save_pixtral(root / "pixtral_seeded", cfg)
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        job = copy.deepcopy(cfg)
        job.train.seed = seed
        ckpt = import_hf(root / "lm_seeded", root / f"seeded_{name}", job,
                         vision_tower=root / "pixtral_seeded")
        runs[name] = model_tensors(imported(ckpt, job, tok).state_dict())
    whole = model_tensors(local.build_cpu_model(local.single_process(copy.deepcopy(cfg)), tok).state_dict())
    fresh = [n for n in runs["a"] if n.startswith("projector.")]
    assert fresh
    random = [n for n in fresh if whole[n].std() > 0]  # the weights; biases are constants
    assert random
    rows = 300  # the HF vocabulary, the tokenizer's ids; the job pads them to 384 rows
    vocab = ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight")
    for name, a in runs["a"].items():
        b, c = runs["b"][name], runs["c"][name]
        assert torch.equal(a, b), name
        if name in vocab:
            assert torch.equal(a[:rows], c[:rows]) and not torch.equal(a[rows:], c[rows:]), name
            assert 0.8 < a[rows:].std() / whole[name][rows:].std() < 1.25, name
        else:
            assert torch.equal(a, c) != (name in random), name
    for name in fresh:
        w, a = whole[name], runs["a"][name]
        if name in random:
            assert 0.8 < a.std() / w.std() < 1.25, name
        else:
            assert torch.equal(a, w), name
