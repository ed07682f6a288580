"""Our side of a conversion: find a checkpoint, read its config, build the model on CPU at
TP=1/PP=1 and load the weights (a dist checkpoint reshards from any saved layout)."""
from __future__ import annotations

import zlib
from dataclasses import replace
from pathlib import Path

import torch

from mmpretrain import checkpoint
from mmpretrain.config import Config, ConfigError, ParallelConfig, load
from mmpretrain.data.specials import ROLES_FILE
from mmpretrain.data.tokenizer import TextTokenizer, id_changes
from mmpretrain.hf import ConversionError


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (`.../checkpoints/step_N`) or a run directory (its `latest`)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    if path.is_dir():
        found = checkpoint.latest_checkpoint(path)
        if found is not None:
            return found
    raise ConfigError(f"{path}: not a checkpoint directory (no state.json) nor a run directory "
                      f"with checkpoints/latest")


def check_not_under_file(out: Path) -> None:
    """A directory can be written at `out`: it, or the nearest of its parents that exists, is a
    directory; else a ConversionError."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ConversionError(f"{existing} is a file; a directory is to be written at {out}")


def single_process(cfg: Config) -> Config:
    """The config with the parallel layout of one process (TP=1, PP=1) and fp32 weights."""
    cfg.parallel = ParallelConfig()
    cfg.train.precision = "fp32"
    return cfg


def checkpoint_config(ckpt: Path) -> Config:
    """The resolved config saved inside a checkpoint, for one CPU process."""
    path = ckpt / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{ckpt}: no config.yaml in the checkpoint")
    return single_process(load(path))


def open_tokenizer(cfg: Config, override: str | Path | None = None,
                   ckpt: Path | None = None) -> TextTokenizer:
    """Checkpoint `ckpt`'s copy of the tokenizer it was trained with, else the dataset's
    (`data.path`/tokenizer.json: a checkpoint saved before the copies); or the file `override`
    names, which must give every token the id the checkpoint's copy gives it."""
    own = ckpt / "tokenizer.json" if ckpt is not None else None
    if own is not None and own.is_file() and not override:
        return TextTokenizer.load(own)
    path = Path(override) if override else Path(cfg.data.path) / "tokenizer.json"
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"no tokenizer at {path} (data.path is {cfg.data.path!r}; "
                          f"pass --tokenizer PATH to name tokenizer.json)")
    tok = TextTokenizer.load(path)
    if own is not None and own.is_file():
        trained = TextTokenizer.load(own)
        moved = id_changes(trained.tokenizer, tok.tokenizer)
        if moved:
            raise ConversionError(f"--tokenizer {override}: {moved} of the tokens of {own} (the "
                                  f"tokenizer the checkpoint trained with) have other ids there; "
                                  f"leave --tokenizer out to use the checkpoint's")
        if tok.role_tokens != trained.role_tokens:
            raise ConversionError(f"--tokenizer {override}: BOS/EOS {tok.bos_token} {tok.eos_token}, "
                                  f"the checkpoint trained with {trained.bos_token} {trained.eos_token} "
                                  f"({own.with_name(ROLES_FILE)}); leave --tokenizer out")
    return tok


def reference(cfg: Config) -> Config:
    """`cfg` with the local spec and without FP8: the model exports and evaluations compare with."""
    return replace(cfg, model=replace(cfg.model, spec="local"), train=replace(cfg.train, fp8=None))


def build_cpu_model(cfg: Config, tok: TextTokenizer, vocab_size: int | None = None,
                    meta: bool = False):
    """The model of `cfg` in one process, in eval mode (megatron initialised here): on CPU, or on
    the GPU when one is present (megatron's layers then allocate there), or with `meta` on the
    meta device. Always the local spec without FP8: the reference that exports and evaluations
    compare with. `vocab_size`: the embedding's rows (default: the tokenizer's, padded as for
    `cfg`'s layout)."""
    from mmpretrain.model.build import build_model
    from mmpretrain.parallel import cuda_to_cpu, init_distributed

    cfg = reference(cfg)
    init_distributed(seed=cfg.train.seed)
    with cuda_to_cpu():
        model = build_model(cfg, vocab_size or tok.vocab_size, tok.img_id, meta)
    return model.eval()


def part_seed(seed: int, prefix: str) -> int:
    """The seed a part of the model is initialised from alone: the job's, and the part's name."""
    return (seed * 1_000_003 + zlib.crc32(prefix.encode())) % 2**31


def build_cpu_parts(cfg: Config, vocab_size: int, prefixes) -> dict[str, torch.Tensor]:
    """The tensors of the model parts `prefixes` (`model.build.part_builders`' names), each built
    alone on CPU from its own seed (`part_seed`) in `cfg`'s dtype: {state-dict name: tensor}."""
    from mmpretrain.hf.mapping import model_tensors
    from mmpretrain.model.build import param_dtype, part_builders
    from mmpretrain.parallel import cuda_to_cpu, init_distributed

    cfg = reference(cfg)
    init_distributed(seed=cfg.train.seed)
    builders, out = part_builders(cfg, vocab_size, cpu=True), {}
    with cuda_to_cpu():
        for prefix in sorted(prefixes):
            torch.manual_seed(part_seed(cfg.train.seed, prefix))
            module = builders[prefix]().to(param_dtype(cfg))
            out.update({f"{prefix}.{k}": v.detach() for k, v in model_tensors(module.state_dict()).items()})
    return out


def meta_model(ckpt: Path, cfg: Config, tok: TextTokenizer):
    """The checkpoint's model on the meta device: its tensors' names, shapes and checkpoint keys
    (`sharded_state_dict`) without memory, to read them a few at a time (`checkpoint.CheckpointSlices`)."""
    return build_cpu_model(cfg, tok, checkpoint_vocab(ckpt), meta=True)


def load_cpu_model(ckpt: Path, cfg: Config, tok: TextTokenizer):
    """The checkpoint's model on CPU in fp32, with the checkpoint's padded vocabulary (training
    pads it for its tensor parallel size, see `model/build.padded_vocab_size`)."""
    from mmpretrain.parallel import cuda_to_cpu

    model = build_cpu_model(cfg, tok, checkpoint_vocab(ckpt))
    with cuda_to_cpu():
        checkpoint.load_model(ckpt, model)
    return model


def _embedding(ckpt: Path):
    """The checkpoint's metadata of the word embeddings (a ShardedTensor), or None."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    return next((t for key, t in meta.items()
                 if "word_embeddings" in key and not key.startswith("optimizer")), None)


def checkpoint_dtype(ckpt: Path) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (that of the word embeddings)."""
    found = _embedding(ckpt)
    return torch.float32 if found is None else found.dtype


def checkpoint_vocab(ckpt: Path) -> int | None:
    """The rows of the checkpoint's word embeddings: the vocabulary padded for the layout it was
    trained under (None when it has none)."""
    found = _embedding(ckpt)
    return None if found is None else int(found.global_shape[0])
