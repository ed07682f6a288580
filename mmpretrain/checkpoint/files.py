"""A run's checkpoint directory: names, the `latest` pointer, leftovers of crashed saves,
retention, and file integrity.

<run>/checkpoints/step_00000100/   a complete checkpoint (renamed into place when written)
<run>/checkpoints/.tmp-step_*/     a save in progress, or left by a crash: never loaded
<run>/checkpoints/latest           names the newest complete checkpoint; replaced atomically
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
LATEST = "latest"
TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or not matching the model."""


def dcp_causes(e) -> list[BaseException]:
    """The errors behind torch's CheckpointException (a BaseException whose text names only
    ranks): its failures are (error, traceback) pairs or errors."""
    return [c[0] if isinstance(c, tuple) else c for c in e.failures.values()]


class DamagedCheckpointError(CheckpointError):
    """A file of the checkpoint is missing, truncated or unreadable."""


def checkpoint_root(run_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    """The directory of the checkpoint of `step`."""
    return root / f"step_{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def stale_saves(run_dir: str | Path) -> list[Path]:
    """Half-written checkpoints left by a crash during a save."""
    root = checkpoint_root(run_dir)
    return sorted(root.glob(TMP_PREFIX + "*")) if root.is_dir() else []


REPLACED = TMP_PREFIX + "replaced-"  # a complete checkpoint moved aside for a new one of its step


def clear_stale_saves(run_dir: str | Path) -> None:
    """Report and delete half-written checkpoints (they were never published); put back a
    complete one that a crash caught moved aside before its replacement was in place."""
    for path in stale_saves(run_dir):
        final = path.with_name(path.name[len(REPLACED):])
        if path.name.startswith(REPLACED) and not final.exists():
            log.warning("restoring %s: its replacement was not saved", final)
            os.replace(path, final)
            continue
        log.warning("ignoring %s: a checkpoint save that did not finish; deleting it", path)
        shutil.rmtree(path, ignore_errors=True)


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the checkpoints in `root`, oldest first (not a copy the user made,
    step_N.bak)."""
    found = ((re.fullmatch(r"step_(\d+)", p.name), p) for p in root.glob("step_*") if p.is_dir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def prune(root: Path, keep: int, keep_every: int, protect: str) -> None:
    """Keep the newest `keep` checkpoints and every step divisible by `keep_every`; never the one
    named `protect` (latest)."""
    done = step_dirs(root)
    for step, p in done[:-keep] if keep > 0 else []:
        if p.name == protect or (keep_every and step % keep_every == 0):
            continue
        shutil.rmtree(p, ignore_errors=True)


def read_file(path: Path, name: str):
    """The checkpoint's file `name` (JSON, or a torch file); an error naming it when it is missing
    or cannot be read."""
    f = path / name
    if not f.is_file():
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {name} is missing")
    try:
        if f.suffix == ".json":
            return json.loads(f.read_text())
        import torch

        return torch.load(f, weights_only=False)
    except Exception as e:  # noqa: BLE001 - json, pickle and zip readers raise their own types
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {name} cannot be read "
                              f"({type(e).__name__}: {e})") from None


def check_files(path: Path) -> dict:
    """Every file the checkpoint's index names exists and is long enough, and its small files
    read; else name the file. Returns state.json."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in ("state.json", ".metadata", "common.pt"):
        if not (path / name).is_file():
            raise DamagedCheckpointError(f"checkpoint {path} is damaged: {name} is missing")
    meta = read_file(path, "state.json")
    for name in ("metadata.json", "common.pt"):
        if (path / name).is_file():
            read_file(path, name)
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: cannot read .metadata ({e})") from None
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            raise DamagedCheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        if f.stat().st_size < size:
            raise DamagedCheckpointError(f"checkpoint {path} is damaged: {name} is truncated "
                                  f"({f.stat().st_size} of at least {size} bytes)")
    return meta


def check_shapes(path: Path, sharded_state: dict) -> None:
    """The model's tensors have the shapes the checkpoint holds; else name the first that differs."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(path))
    for t in nested_values(sharded_state):
        if not isinstance(t, ShardedTensor):
            continue
        if t.key not in saved:
            raise CheckpointError(f"checkpoint {path} has no tensor {t.key} (the configured model "
                                  f"has it: does the config match the checkpoint's config.yaml?)")
        have = tuple(saved[t.key].global_shape if hasattr(saved[t.key], "global_shape")
                     else saved[t.key].shape)
        if have != tuple(t.global_shape):
            vocab = t.key.endswith(("word_embeddings.weight", "output_layer.weight"))
            raise CheckpointError(
                f"checkpoint {path} holds {t.key} with shape {list(have)}; the configured model has "
                f"{list(t.global_shape)}" + (" (the vocabulary is padded to a multiple of "
                "lcm(128, parallel.tp): decoder.vocab_size, the tokenizer or a tp that does not "
                "divide 128 changes its rows)" if vocab and have[1:] == tuple(t.global_shape)[1:]
                                              else ""))


def complete_before(path: Path) -> Path | None:
    """The newest checkpoint of an earlier step than `path`, beside it, whose files check; None
    when there is none (or `path` is not a step directory)."""
    m = re.fullmatch(r"step_(\d+)", path.name)
    older = [p for step, p in step_dirs(path.parent) if m and step < int(m.group(1))]
    for p in reversed(older):
        try:
            check_files(p)
        except CheckpointError:
            continue
        return p
    return None
