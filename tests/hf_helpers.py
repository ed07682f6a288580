"""Tiny models for the Hugging Face conversion tests: a job config, a tokenizer, a checkpoint with
random weights (norm weights and biases included, so a misplaced one shows), tiny HF models."""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from mmpretrain.config import Config, dump

TEXTS = [f"{size} {colour} {shape} at the {where}. question: what color is the {shape}? answer: {colour}."
         for size, colour, shape, where in itertools.product(
             ("a small", "a big"), ("red", "green", "blue", "yellow"), ("circle", "square", "star"),
             ("top left", "center", "bottom right"))]


def tiny_config(data_path: Path) -> Config:
    """A small D model: vision 32 wide (2 heads of 16), decoder 64 wide (4 heads, 2 kv groups)."""
    cfg = Config()
    cfg.data.path = str(data_path)
    cfg.data.seq_length = 128
    cfg.vision.patch_size, cfg.vision.hidden_size, cfg.vision.num_attention_heads = 4, 32, 2
    cfg.vision.ffn_hidden_size, cfg.vision.rope_theta = 48, 100.0
    cfg.decoder.hidden_size, cfg.decoder.ffn_hidden_size, cfg.decoder.rope_theta = 64, 96, 500.0
    cfg.decoder.norm_eps = 1e-6
    cfg.train.precision = "fp32"
    return cfg


def write_dataset_tokenizer(data_path: Path, vocab_size: int = 300):
    """tokenizer.json under data_path (the only file of the dataset the conversion reads); above
    300 ids it learns numbers too (TEXTS alone give at most 357)."""
    from mmpretrain.data.tokenizer import TextTokenizer

    data_path.mkdir(parents=True, exist_ok=True)
    extra = [f"picture {i}: {i * 37 % 1000} dots, {i * 11 % 97} lines" for i in range(400)]
    tok = TextTokenizer.train(TEXTS * 4 + (extra if vocab_size > 300 else []), vocab_size=vocab_size)
    tok.save(data_path / "tokenizer.json")
    return tok


def randomize(model, seed: int = 0) -> None:
    """Weights ~ N(0, 0.05), norm weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.05)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 and "bias" not in name else 0.05 * noise)


def random_checkpoint(run_dir: Path, cfg: Config, tok, seed: int = 0) -> Path:
    """A weights-only checkpoint of a randomly initialised model of `cfg`, built in this process
    with the global tensors `cfg`'s layout saves (the vocabulary padded for parallel.tp)."""
    import copy

    from mmpretrain.parallel import cuda_to_cpu

    from mmpretrain import checkpoint
    from mmpretrain.hf import local
    from mmpretrain.model.build import padded_vocab_size

    rows = padded_vocab_size(tok.vocab_size, cfg.parallel.tp)
    model = local.build_cpu_model(local.single_process(copy.deepcopy(cfg)), tok, rows)
    randomize(model, seed)
    with cuda_to_cpu():
        ckpt = checkpoint.save_weights(run_dir, 0, model, cfg, "random")
    dump(cfg, run_dir / "config.yaml")
    return ckpt


def pixtral_config(cfg: Config, **overrides):
    from transformers import PixtralVisionConfig

    v = cfg.vision
    kw = dict(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
              num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads,
              image_size=256, patch_size=v.patch_size, hidden_act="silu", rope_theta=v.rope_theta)
    return PixtralVisionConfig(**{**kw, **overrides})


def text_config(cfg: Config, kind: str = "llama", vocab: int = 300, **overrides):
    from transformers import LlamaConfig, MistralConfig

    d = cfg.decoder
    kw = dict(vocab_size=vocab, hidden_size=d.hidden_size, intermediate_size=d.ffn_hidden_size,
              num_hidden_layers=d.num_layers, num_attention_heads=d.num_attention_heads,
              num_key_value_heads=d.num_query_groups, rms_norm_eps=d.norm_eps, rope_theta=d.rope_theta,
              tie_word_embeddings=False)
    if kind == "mistral":
        kw["sliding_window"] = None
    return (MistralConfig if kind == "mistral" else LlamaConfig)(**{**kw, **overrides})


def save_llava(out: Path, cfg: Config, tok, seed: int = 1):
    """A random LlavaForConditionalGeneration (Pixtral tower, Llama decoder) saved in `out`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    conf = LlavaConfig(vision_config=pixtral_config(cfg), text_config=text_config(cfg, vocab=tok.vocab_size),
                       image_token_index=tok.img_id, vision_feature_layer=-1,
                       vision_feature_select_strategy="full", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(conf).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    return model


def save_causal_lm(out: Path, cfg: Config, kind: str = "llama", seed: int = 2, safe: bool = True,
                   **overrides):
    """A random LlamaForCausalLM / MistralForCausalLM saved in `out`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(text_config(cfg, kind, **overrides)).eval()
    randomize(model, seed)
    model.save_pretrained(out, safe_serialization=safe)
    return model


def save_pixtral(out: Path, cfg: Config, seed: int = 3):
    """A random PixtralVisionModel saved in `out`."""
    from transformers import PixtralVisionModel

    model = PixtralVisionModel(pixtral_config(cfg)).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    return model


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an export's safetensors shards."""
    from safetensors import safe_open

    out = {}
    for shard in directory.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def design_config(data_path: Path, design: str = "d", tiles: bool = False, merge: int = 1) -> Config:
    """The tiny model in another design (X: cross-attention before decoder layer 2; H: before
    both), with NVLM tiles of 16 px (4 x 4 patches, at most 4 + a thumbnail) and/or 2x2 merge."""
    cfg = tiny_config(data_path)
    cfg.model.design = design
    cfg.model.cross_attention_layers = {"x": [2], "h": [1, 2]}.get(design, [])
    cfg.projector.merge = merge
    if tiles:
        cfg.data.resize, cfg.data.tile_size, cfg.data.max_tiles = "tiles", 16, 4
    return cfg
