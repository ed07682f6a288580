"""Where a run starts: its own latest checkpoint, a named one, the weights of another run
(`checkpoint.init_from`), or nothing."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import yaml

from mmpretrain.checkpoint import CheckpointError, checkpoint_root, clear_stale_saves, latest_checkpoint
from mmpretrain.config import Config, ConfigError, to_dict
from mmpretrain.parallel import is_rank0

log = logging.getLogger("mmpretrain")


def resolve_checkpoint(path: str | Path, what: str = "--resume") -> Path:
    """A checkpoint directory, or a run directory standing for its latest checkpoint; `what`
    names the setting in the error."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{what} {path}: neither a checkpoint nor a run with one")
    return latest


def _after_rank0() -> None:
    """Wait until rank 0 has tidied the run directory (every rank calls it; none without a
    process group)."""
    if dist.is_initialized():
        dist.barrier()


def start_checkpoint(run_dir: Path, resume: str | None, fresh: bool, overwrite: bool,
                     rank0: bool) -> Path | None:
    """The checkpoint to start from. By default the run's own `latest` (half-written saves are
    reported and removed first); `resume` names another; `fresh` refuses a non-empty run directory
    unless `overwrite`, which empties it."""
    if fresh:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            if not overwrite:  # no rank deletes anything: every rank sees it and raises
                raise ConfigError(f"--no-resume: {run_dir} is not empty (pass --overwrite to "
                                  f"delete its contents and start afresh)")
            if rank0:
                for child in run_dir.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        _after_rank0()  # on every rank, whatever it saw of the directory
        return None
    if rank0:
        clear_stale_saves(run_dir)
    _after_rank0()  # a checkpoint put back by rank 0 is in place before any rank reads `latest`
    own = latest_checkpoint(run_dir) if checkpoint_root(run_dir).is_dir() else None
    if resume is None:
        return own
    named = resolve_checkpoint(resume)
    if rank0 and own is not None and own.resolve() != named.resolve():
        log.warning("--resume %s: starting from %s, not this run's own latest checkpoint %s; a "
                    "restart with the same --resume (a requeued job script) starts from %s again "
                    "(without --resume a restart takes the run's latest)", resume, named, own.name,
                    named)
    return named


@dataclass(frozen=True)
class Start:
    """Where a run starts: `checkpoint` None for a fresh start; `weights_only` for the model
    weights of another run (`checkpoint.init_from`) with a fresh optimizer, schedule, step and data
    position."""

    checkpoint: Path | None
    weights_only: bool = False


def start_point(run_dir: Path, resume: str | None, fresh: bool, overwrite: bool, rank0: bool,
                init_from: str = "") -> Start:
    """`start_checkpoint`, and when that finds nothing (a new or emptied run directory, no
    --resume), the weights of `init_from` if set. A run that has saved a checkpoint of its own
    resumes from it instead, so a requeued stage-2 job never re-initialises from stage 1."""
    own = start_checkpoint(run_dir, resume, fresh, overwrite, rank0)
    if own is not None or not init_from:
        return Start(own)
    return Start(resolve_checkpoint(init_from, "checkpoint.init_from"), weights_only=True)


DATA_SETTINGS_KEPT = ("cache_dir", "cache_limit", "workers", "decoder", "micro_batch_size")
"""data.* settings a resume may change without a warning: where and how samples are read (the
batches stay those of an uninterrupted run), and the micro-batch size (like train.global_batch_size,
a change of the number of slots, which the loader re-splits exactly: every sample once, in other
batches; docs/data.md)."""


def data_changes(ckpt: Path, cfg: Config, saved_sizes: list[int] | None, sizes: list[int]
                 ) -> list[str]:
    """What changed since checkpoint `ckpt` was saved in what the loader reads: the data.*
    settings of its config.yaml (but DATA_SETTINGS_KEPT), and the datasets' sizes (`saved_sizes`
    from the saved loader state, None when it has none)."""
    try:
        saved = (yaml.safe_load((ckpt / "config.yaml").read_text()) or {}).get("data", {})
    except (OSError, yaml.YAMLError, AttributeError):
        saved = {}
    changes = [f"data.{k} {saved[k]!r} -> {v!r}" for k, v in to_dict(cfg)["data"].items()
               if k in saved and k not in DATA_SETTINGS_KEPT and saved[k] != v]
    if saved_sizes is not None and list(saved_sizes) != list(sizes):
        changes.append(f"dataset sizes {list(saved_sizes)} -> {list(sizes)}")
    return changes


def check_tokenizer(ckpt: Path | None, tok) -> None:
    """The data's tokenizer `tok` gives every token of checkpoint `ckpt`'s copy (the tokenizer its
    weights trained with) the id it had there, else a ConfigError: the embedding rows would be
    read as other tokens. Tokens added after them are fine; a changed BOS/EOS is a warning."""
    from mmpretrain.data.tokenizer import TextTokenizer, id_changes

    if ckpt is None or not (ckpt / "tokenizer.json").is_file():
        return  # none to compare with (a checkpoint saved before the copies)
    saved = TextTokenizer.load(ckpt / "tokenizer.json")
    moved = id_changes(saved.tokenizer, tok.tokenizer)
    if moved:
        raise ConfigError(f"data.path's tokenizer gives {moved} of the tokens of "
                          f"{ckpt / 'tokenizer.json'} (the tokenizer the checkpoint's weights "
                          f"trained with) other ids or none: its embedding rows would be read as "
                          f"other tokens; train with that tokenizer (copy it, and its roles file if "
                          f"it has one, into data.path)")
    if saved.role_tokens != tok.role_tokens and is_rank0():
        log.warning("the samples now begin with %s and end with %s; the checkpoint trained with %s "
                    "and %s (%s)", tok.bos_token, tok.eos_token, saved.bos_token, saved.eos_token,
                    ckpt / "tokenizer.json")
