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


def model_state(chunks) -> dict:
    """Sharded state of this rank's model chunks, as {"model0": ..., "model1": ...}. The tensors
    carry global keys, so any layout (tp, pp, virtual stages) can load what another saved."""
    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_into(chunks, state: dict) -> None:
    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    for i, c in enumerate(chunks):
        c.load_state_dict(state[f"model{i}"])


def save(run_dir: str | Path, step: int, chunks, optimizer, scheduler, loader_state: dict,
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
    state = model_state(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(dict(state))
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


def load_model(path: Path, chunks) -> None:
    """Load only the model weights of a checkpoint into a model or list of chunks (any layout)."""
    _load_into(chunks, dist_checkpointing.load(model_state(chunks), str(path)))


def load_training(path: Path, chunks, optimizer, scheduler) -> dict:
    """Load model, optimizer and schedule; return state.json plus this rank's loader position.
    A weights-only checkpoint (`save_weights`) loads the model and keeps the fresh optimizer."""
    if json.loads((path / "state.json").read_text()).get("weights_only"):
        return _load_weights_only(path, chunks, optimizer)
    request = model_state(chunks)
    request["optimizer"] = optimizer.sharded_state_dict(dict(request), is_loading=True)
    state = dist_checkpointing.load(request, str(path))
    _load_into(chunks, state)
    optimizer.load_state_dict(state["optimizer"])
    meta = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    loader = path / f"loader_dp{parallel_state.get_data_parallel_rank()}.json"
    meta["loader"] = json.loads(loader.read_text()) if loader.is_file() else None
    return meta


def _load_weights_only(path: Path, chunks, optimizer) -> dict:
    """Model weights into the chunks and the optimizer's main copies; schedule and data start."""
    load_model(path, chunks)
    optimizer.reload_model_params()  # mixed precision keeps fp32 main params copied at build
    return {**json.loads((path / "state.json").read_text()), "loader": None}


def save_weights(run_dir: str | Path, step: int, chunks, cfg: Config, source: str) -> Path:
    """A weights-only checkpoint (no optimizer, schedule or data position) published as
    `latest`, from one process; `mmpretrain train` on the run directory starts from it.
    `source` says where the weights came from (recorded in state.json)."""
    root = checkpoint_root(run_dir)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dist_checkpointing.save(model_state(chunks), str(tmp))
    meta = {"step": step, "consumed_samples": 0, "weights_only": True, "source": source}
    (tmp / "state.json").write_text(json.dumps(meta))
    dump(cfg, tmp / "config.yaml")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_atomic(root / LATEST, final.name + "\n")
    return final
