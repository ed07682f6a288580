"""Checkpoints with megatron dist_checkpointing (torch_dist): layout-independent, written under a
temporary name and renamed, with a `latest` pointer replaced atomically.

<run>/checkpoints/step_00000100/   dist checkpoint of model + optimizer, plus
                 ├── state.json     step, LR schedule, consumed samples (rank 0)
                 ├── loader_dp{r}.json  the data loader's position of data-parallel rank r
                 └── config.yaml    the resolved config
<run>/checkpoints/latest            text file naming the newest complete checkpoint
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from mmpretrain.config import Config, dump

LATEST = "latest"


def checkpoint_root(run_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(run_dir: str | Path, step: int, model, optimizer, scheduler, loader_state: dict,
         cfg: Config, consumed_samples: int, keep: int = 2) -> Path:
    """Save on all ranks; rank 0 publishes it as `latest` once every rank has written."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}
    dist_checkpointing.save(state, str(tmp))
    if parallel_state.get_tensor_model_parallel_rank() == 0 and \
            parallel_state.get_pipeline_model_parallel_rank() == 0:
        dp = parallel_state.get_data_parallel_rank()
        (tmp / f"loader_dp{dp}.json").write_text(json.dumps(loader_state))
    if rank == 0:
        meta = {"step": step, "consumed_samples": consumed_samples,
                "scheduler": scheduler.state_dict()}
        (tmp / "state.json").write_text(json.dumps(meta))
        dump(cfg, tmp / "config.yaml")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        _prune(root, keep, final.name)
    dist.barrier()
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    """Delete all but the newest `keep` checkpoints; never the one `latest` names."""
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in done[:-keep] if keep > 0 else []:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def load_model(path: Path, model) -> None:
    """Load only the model weights of a checkpoint into `model` (any layout)."""
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"])


def load_training(path: Path, model, optimizer, scheduler) -> dict:
    """Load model, optimizer and schedule; return state.json plus this rank's loader position."""
    model_sd = model.sharded_state_dict()
    state = dist_checkpointing.load(
        {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)},
        str(path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    meta = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    loader = path / f"loader_dp{parallel_state.get_data_parallel_rank()}.json"
    meta["loader"] = json.loads(loader.read_text()) if loader.is_file() else None
    return meta
