"""Saving and loading with megatron dist_checkpointing (torch_dist), layout-independent.

A checkpoint holds the model and optimizer (sharded tensors under global names: any tp/pp/vpp/dp
layout loads what another saved; the distributed optimizer's state only at the same tp/pp/vpp,
see optim_state.py), plus files next to them:
    state.json          step, consumed samples, LR schedule, optimizer format (rank 0)
    loader_dp{r}.json   the data loader's state of data-parallel rank r (its micro-batch slots)
    rng/rank{r}.pt      the RNG states of global rank r (restored when the layout is unchanged)
    config.yaml         the resolved config
    tokenizer.json      a copy of the tokenizer its token ids come from (data.path's), for exports
    tokenizer_roles.json  (when data.path has one) the tokens taking the BOS/EOS roles

Saving is synchronous, or asynchronous with megatron-core's own machinery (`AsyncSaves`,
`checkpoint.async_save`): the tensors are planned and staged on the host while training waits,
then written by a forked process (megatron's `TemporalAsyncCaller`) while training goes on; once
every rank has written, the finalize step (megatron's `.metadata`, then ours: rename and
`latest`) publishes the checkpoint. Everything else (state.json, loader, RNG, config) describes
the step of the save and is written into the temporary directory when the save is scheduled.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from mmpretrain.checkpoint import optim_checks, optim_state, rng
from mmpretrain.checkpoint.files import (
    LATEST,
    REPLACED,
    TMP_PREFIX,
    CheckpointError,
    check_files,
    check_shapes,
    checkpoint_root,
    prune,
    read_file,
    step_dir,
    write_atomic,
)
from mmpretrain.checkpoint.streamed import save_streamed
from mmpretrain.config import Config, dump
from mmpretrain.data.specials import ROLES_FILE
from mmpretrain.stop_signals import stop_signals_held

log = logging.getLogger(__name__)


def model_state(chunks) -> dict:
    """Sharded state of this rank's model chunks, as {"model0": ..., "model1": ...}. The tensors
    carry global keys, so any layout (tp, pp, virtual stages) can load what another saved."""
    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_into(chunks, state: dict) -> None:
    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    for i, c in enumerate(chunks):
        c.load_state_dict(state[f"model{i}"])


def _publish(tmp: Path, final: Path, keep: int = 0, keep_every: int = 0) -> None:
    """Rename a fully written checkpoint into place and point `latest` at it (rank 0). A
    checkpoint of the same step (a run resumed from an earlier one) is moved aside first and
    deleted last, so `latest` is never left naming a half-deleted directory."""
    old = final.with_name(REPLACED + final.name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    write_atomic(final.parent / LATEST, final.name + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if keep:
        prune(final.parent, keep, keep_every, final.name)


def _write_rank_files(tmp: Path, loader_state: dict) -> None:
    """This rank's RNG states; the loader position once per data-parallel rank."""
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng.capture(), tmp / "rng" / f"rank{dist.get_rank()}.pt")
    if parallel_state.get_tensor_model_parallel_rank() == 0 and \
            parallel_state.get_pipeline_model_parallel_rank() == 0:
        dp = parallel_state.get_data_parallel_rank()
        (tmp / f"loader_dp{dp}.json").write_text(json.dumps(loader_state))


class AsyncSaves:
    """Checkpoint saves in flight: megatron-core's `AsyncCallsQueue` with one forked writer per
    save (`TemporalAsyncCaller`). Every method is a collective while a save is pending: all ranks
    call it at the same points of the loop."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)  # a persistent worker would get the
        # tensors through shared memory; on CPU those are the live parameters, still training
        self.scheduled: dict[int, float] = {}  # step -> time scheduled

    @property
    def pending(self) -> int:
        """Saves scheduled and not yet published."""
        return self.queue.get_num_unfinalized_calls()

    def schedule(self, request, step: int) -> None:
        self.scheduled[step] = time.time()
        with stop_signals_held():  # the forked writer, and what it starts, outlive a stop signal
            self.queue.schedule_async_request(request)

    def poll(self) -> None:
        """Publish the saves every rank has finished writing; never waits for a write."""
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until every scheduled save is written and published."""
        if self.pending:
            self.queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        """Wait for the pending saves; stop the writer."""
        self.wait()
        self.queue.close()


def _describe(tmp: Path, cfg: Config) -> None:
    """config.yaml, and a copy of the tokenizer the run's token ids come from: an export takes it
    from the checkpoint, whatever became of data.path since."""
    dump(cfg, tmp / "config.yaml")
    for name in ("tokenizer.json", ROLES_FILE):
        if (Path(cfg.data.path) / name).is_file():
            shutil.copyfile(Path(cfg.data.path) / name, tmp / name)


def save(run_dir: str | Path, step: int, chunks, optimizer, scheduler, loader_state: dict,
         cfg: Config, consumed_samples: int, keep: int = 2, keep_every: int = 0,
         async_saves: AsyncSaves | None = None, skipped_in_a_row: int = 0) -> Path:
    """Save on all ranks under a temporary name; rank 0 publishes it as `latest` once every rank
    has written, so a crash at any point leaves the previous checkpoint and `latest` intact.

    With `async_saves` the tensor files are written in the background and this returns once they
    are staged; the checkpoint is published by a later `async_saves.poll()` or `.wait()`.
    `skipped_in_a_row`: the non-finite steps the run has skipped in a row up to `step`, so that a
    resumed run stops at train.max_skipped_steps where the uninterrupted one would."""
    if async_saves is not None:
        async_saves.wait()  # one save at a time: the previous one is published first
    t0 = time.time()
    root = checkpoint_root(run_dir)
    final, tmp = step_dir(root, step), root / (TMP_PREFIX + step_dir(root, step).name)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = model_state(chunks)
    state["optimizer"] = optim_state.to_save(optimizer, dict(state), cfg)
    with stop_signals_held():  # the helper processes the save starts must outlive a stop signal
        request = dist_checkpointing.save(state, str(tmp),
                                          async_sharded_save=async_saves is not None)
    _write_rank_files(tmp, loader_state)
    if dist.get_rank() == 0:
        meta = {"step": step, "consumed_samples": consumed_samples,
                "skipped_in_a_row": skipped_in_a_row,
                "scheduler": schedule_state(scheduler), "world_size": dist.get_world_size(),
                "layout": _layout(), "optimizer": optim_state.save_format(cfg),
                "optimizer_groups": optim_checks.group_ids(optimizer),
                "trains": optim_checks.trains(cfg)}
        (tmp / "state.json").write_text(json.dumps(meta))
        _describe(tmp, cfg)

    def publish() -> None:  # after every rank has written its files
        dist.barrier()
        if dist.get_rank() == 0:
            _publish(tmp, final, keep, keep_every)
        dist.barrier()

    if async_saves is None:
        publish()
        if dist.get_rank() == 0:
            log.info("checkpoint %s saved in %.2f s", final.name, time.time() - t0)
        return final

    def published() -> None:
        publish()
        took = time.time() - async_saves.scheduled.pop(step, time.time())
        if dist.get_rank() == 0:
            log.info("checkpoint %s written in the background and published (%.1f s after "
                     "it was scheduled)", final.name, took)

    request.add_finalize_fn(published)
    async_saves.schedule(request, step)
    if dist.get_rank() == 0:
        log.info("checkpoint %s staged in %.2f s; writing it in the background", final.name,
                 time.time() - t0)
    return final


def _layout() -> list[int]:
    return [parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
            parallel_state.get_data_parallel_world_size()]


def load_model(path: Path, chunks) -> None:
    """Load only the model weights of a checkpoint into a model or list of chunks (any layout)."""
    check_files(path)
    _load_checked_model(path, chunks)


def _load_checked_model(path: Path, chunks, fresh_cross_attention: bool = False
                        ) -> tuple[list[str], list[str]]:
    """The model's weights from a checkpoint whose files check_files has checked. With
    `fresh_cross_attention`, cross-attention layers the checkpoint has none of keep their
    initialisation, and those the model has none of are left out; returns both lists of names."""
    request = model_state(chunks)
    fresh, left_out = _match_cross_attention(path, request) if fresh_cross_attention else ([], [])
    check_shapes(path, request)
    state = dist_checkpointing.load(request, str(path))
    for i, c in enumerate(chunks if isinstance(chunks, (list, tuple)) else [chunks]):
        missing, unexpected = c.load_state_dict(state[f"model{i}"], strict=not fresh)
        if unexpected or any(not any(f"{f}." in m for f in fresh) for m in missing):
            raise CheckpointError(f"checkpoint {path}: could not load {unexpected or missing}")
    return fresh, left_out


def load_training(path: Path, chunks, optimizer, scheduler, cfg: Config | None = None) -> dict:
    """Load model, optimizer, schedule and (same layout) RNG states; return state.json plus this
    rank's loader position. A weights-only checkpoint (`save_weights`) loads the model and keeps
    the fresh optimizer. `cfg`, the run's config, is checked to train the saved parts."""
    meta = check_files(path)
    if meta.get("weights_only"):
        return _load_weights_only(path, chunks, optimizer, meta)
    if cfg is not None:
        optim_checks.check_trains(path, meta, cfg)
    request = model_state(chunks)
    check_shapes(path, request)
    request["optimizer"] = optim_state.to_load(optimizer, dict(request), path, meta, _layout())
    state = dist_checkpointing.load(request, str(path))
    _load_into(chunks, state)
    lrs = [(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups]  # the config's
    optim_state.load(optimizer, state["optimizer"], path)
    for group, (max_lr, min_lr) in zip(optimizer.param_groups, lrs, strict=True):
        group["max_lr"], group["min_lr"] = max_lr, min_lr  # not the saved ones: the config holds
    scheduler.load_state_dict(meta["scheduler"])  # the config's schedule at the saved step
    _log_schedule_changes(meta["scheduler"], scheduler)
    meta["same_layout"] = meta.get("layout") == _layout()
    if meta["same_layout"]:  # else the RNG states are reseeded
        rng.restore(read_file(path, f"rng/rank{dist.get_rank()}.pt"))
    meta["loader"] = _loader_state(path, meta)
    return meta


SCHEDULE_SETTINGS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                     "wsd_decay_steps", "lr_wsd_decay_style")


def schedule_state(scheduler) -> dict:
    """megatron's scheduler state, with the wsd settings it leaves out (for `_log_schedule_changes`)."""
    return {**scheduler.state_dict(), "wsd_decay_steps": scheduler.wsd_decay_steps,
            "lr_wsd_decay_style": scheduler.lr_wsd_decay_style}


def _log_schedule_changes(saved: dict, scheduler) -> None:
    """Say which of the learning-rate schedule's settings the config changed since the save."""
    changed = [f"{k} {saved[k]} -> {getattr(scheduler, k)}" for k in SCHEDULE_SETTINGS
               if k in saved and saved[k] != getattr(scheduler, k)]
    if changed and dist.get_rank() == 0:
        log.info("learning-rate schedule from the config, not the checkpoint: %s", ", ".join(changed))


def _loader_state(path: Path, meta: dict) -> list:
    """The saved loader states of all data-parallel ranks: the loader takes its own slots from
    them, or re-splits the stream exactly when the number of slots changed."""
    saved_dp = meta["layout"][3] if meta.get("layout") else 1
    return [read_file(path, f"loader_dp{r}.json") for r in range(saved_dp)]


def _load_weights_only(path: Path, chunks, optimizer, meta: dict) -> dict:
    """Model weights into the chunks and the optimizer's main copies (the files checked);
    schedule and data start."""
    _load_checked_model(path, chunks)
    optimizer.reload_model_params()  # mixed precision keeps fp32 main params copied at build
    return {**meta, "loader": None}


def load_weights(path: Path, chunks, optimizer) -> tuple[list[str], list[str]]:
    """Only the model weights of any checkpoint (full or weights-only, saved under any layout)
    into the chunks and the optimizer's main copies; the optimizer states, schedule, step, RNG and
    data position stay as built (fresh). The weights-only start of `checkpoint.init_from`.

    Cross-attention layers the checkpoint has none of (an NVLM-X or -H model started from a D
    run) keep their fresh initialisation, and those the model has none of (D from an X or H run)
    are left out; returns both lists of names. Any other missing tensor is an error naming it."""
    check_files(path)
    names = _load_checked_model(path, chunks, fresh_cross_attention=True)
    optimizer.reload_model_params()  # mixed precision keeps fp32 main params copied at build
    return names


def _match_cross_attention(path: Path, request: dict) -> tuple[list[str], list[str]]:
    """Remove from `request` every entry of the cross-attention layers that the checkpoint has no
    tensor of; (their layer names, e.g. 'cross_attention_1', and those of the checkpoint's
    cross-attention layers that `request` has no tensor of), each sorted."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    requested = {t.key for d in request.values() for t in d.values() if isinstance(t, ShardedTensor)}
    absent = {_cross_layer(k) for k in requested if k not in saved} - {None}
    left_out = {_cross_layer(k) for k in saved if k not in requested} - {None}
    for d in request.values():
        for name in [n for n, t in d.items() if _cross_layer(getattr(t, "key", "")) in absent]:
            del d[name]
    return sorted(absent), sorted(left_out)


def _cross_layer(key: str) -> str | None:
    """'cross_attention_3' of a key inside that layer, else None."""
    m = re.search(r"(?:^|\.)(cross_attention_\d+)\.", key)
    return m.group(1) if m else None


def save_weights(run_dir: str | Path, step: int, chunks, cfg: Config, source: str) -> Path:
    """A weights-only checkpoint (no optimizer, schedule or data position) published as
    `latest`, from one process; `mmpretrain train` on the run directory starts from it.
    `source` says where the weights came from (recorded in state.json)."""
    return _publish_weights(run_dir, step, cfg, source,
                            lambda tmp: dist_checkpointing.save(model_state(chunks), str(tmp)))


def save_weights_streamed(run_dir: str | Path, step: int, request: dict, value, cfg: Config,
                          source: str) -> Path:
    """`save_weights` of a model that is never whole: `request` is its `sharded_state_dict()`
    (on the meta device), `value(name)` computes one tensor when the writer needs it
    (`streamed.save_streamed`)."""
    return _publish_weights(run_dir, step, cfg, source,
                            lambda tmp: save_streamed(tmp, request, value))


def _publish_weights(run_dir: str | Path, step: int, cfg: Config, source: str, write) -> Path:
    root = checkpoint_root(run_dir)
    final, tmp = step_dir(root, step), root / (TMP_PREFIX + step_dir(root, step).name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = {"step": step, "consumed_samples": 0, "weights_only": True, "source": source}
    (tmp / "state.json").write_text(json.dumps(meta))
    _describe(tmp, cfg)
    _publish(tmp, final)
    return final
