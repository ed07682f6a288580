"""`mmpretrain train`: set up, resume if the run has a checkpoint, train, log, checkpoint."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mmpretrain import checkpoint
from mmpretrain.config import Config, advisories, check_trainable, dump
from mmpretrain.dataset import make_loader, model_vocab_size, open_tokenizer
from mmpretrain.model.build import build_model_chunks
from mmpretrain.parallel import cuda_to_cpu, init_distributed, is_rank0
from mmpretrain.parallel.layout import ParallelLayout
from mmpretrain.train import DivergedError
from mmpretrain.train.data_metrics import data_metrics
from mmpretrain.train.memory import memory_metrics
from mmpretrain.train.metrics import MetricsLogger
from mmpretrain.train.optim import build_optimizer, build_scheduler, trainable_parameters, wrap_ddp
from mmpretrain.train.preempt import REQUEUE_EXIT_CODE, STOPPED_FILE, PreemptionHandler
from mmpretrain.train.profile import StepProfiler
from mmpretrain.train.resume import Start, check_tokenizer, data_changes, start_point
from mmpretrain.train.step import SkippedSteps, device, train_step
from mmpretrain.train.validate import HeldoutLoss

log = logging.getLogger("mmpretrain")


class CountingIterator:
    """Wraps the batch iterator; counts the packed samples handed to the model."""

    def __init__(self, batches):
        self.batches, self.samples = iter(batches), 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.samples += int((batch.sample_ids.max(dim=1).values + 1).sum())
        return batch

    def close(self) -> None:
        """Stop the loader's iteration now (its data workers), not when it is collected."""
        getattr(self.batches, "close", lambda: None)()


def start_processes(cfg: Config, world_size: int | None = None):
    """(layout, tokenizer): the layout validated before any process group, then the groups."""
    layout = ParallelLayout.from_config(cfg, world_size)
    tok = open_tokenizer(cfg)
    init_distributed(layout.tp, layout.pp, layout.vpp, seed=cfg.train.seed)
    return layout, tok


def build_state(cfg: Config, tok, init_weights=None):
    """(model chunks, DDP wrappers, optimizer, schedule). `init_weights(chunks)`, if given, sets
    the weights before the optimizer copies them."""
    with cuda_to_cpu():
        chunks = build_model_chunks(cfg, model_vocab_size(cfg, tok), tok.img_id)
        if init_weights is not None:
            init_weights(chunks)
        ddps = wrap_ddp(chunks, cfg)
        optimizer = build_optimizer(ddps, cfg)
    return chunks, ddps, optimizer, build_scheduler(optimizer, cfg)


def setup(cfg: Config, world_size: int | None = None, init_weights=None):
    """`start_processes` and `build_state`: (layout, tokenizer, chunks, DDPs, optimizer, schedule)."""
    layout, tok = start_processes(cfg, world_size)
    return layout, tok, *build_state(cfg, tok, init_weights)


def _resume(cfg: Config, ckpt, chunks, optimizer, scheduler, loader) -> tuple[int, int, int]:
    """Load a checkpoint into the training state; (step, consumed samples, non-finite steps
    skipped in a row) it was saved at. A warning names the data settings that changed."""
    with cuda_to_cpu():
        meta = checkpoint.load_training(ckpt, chunks, optimizer, scheduler, cfg)
    if meta["loader"] is not None:
        loader.load_state_dict(meta["loader"])
        changes = data_changes(ckpt, cfg, loader.saved_sizes, loader.sizes)
        if changes and is_rank0():
            log.warning("the data differ from the checkpoint's (%s): the loader goes on from the "
                        "saved positions of another sample stream, not the one the run trained "
                        "on (docs/data.md, resuming)", ", ".join(changes))
        if loader.saved_slots != loader.n_slots and is_rank0():
            log.info("micro-batches per global batch %d -> %d (train.global_batch_size / "
                     "data.micro_batch_size): the saved read positions are re-split over them "
                     "(every sample once, in other batches than an uninterrupted run's)",
                     loader.saved_slots, loader.n_slots)
    if is_rank0() and meta.get("weights_only"):
        log.info("started from the weights of %s (%s); optimizer and data order start fresh", ckpt,
                 meta.get("source", "a weights-only checkpoint"))
    elif is_rank0():
        how = "" if meta.get("same_layout", True) else " under another layout (RNG states reseeded)"
        log.info("resumed from %s at step %d%s", ckpt, meta["step"], how)
    return meta["step"], meta["consumed_samples"], meta.get("skipped_in_a_row", 0)


def _init_weights(ckpt, chunks, optimizer) -> tuple[int, int, int]:
    """Only the model weights of another run's checkpoint (`checkpoint.init_from`); the optimizer,
    schedule, step and data position start fresh."""
    from mmpretrain.checkpoint.store import load_weights

    with cuda_to_cpu():
        fresh, left_out = load_weights(ckpt, chunks, optimizer)
    if is_rank0():
        log.info("initialised the model weights from %s (checkpoint.init_from); optimizer, "
                 "schedule, step and data order start fresh", ckpt)
        if fresh:
            log.info("the checkpoint has no %s: these cross-attention layers start from their "
                     "fresh initialisation", ", ".join(fresh))
        if left_out:
            log.info("the model has no %s: the checkpoint's cross-attention layers are left out",
                     ", ".join(left_out))
    return 0, 0, 0


def _open_run(cfg: Config, run_dir: Path, start: int, chunks, n_micro: int) -> MetricsLogger:
    """Rank 0: the run directory with its config.yaml, no stop marker of an earlier attempt, and
    the metrics logger (records after `start` dropped)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump(cfg, run_dir / "config.yaml")
    log.info("model: %.2fM trainable parameters on rank 0; %d micro-batches x %d sequences x "
             "%d tokens per step per dp rank", trainable_parameters(chunks) / 1e6, n_micro,
             cfg.data.micro_batch_size, cfg.data.seq_length)
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)  # a new start; a stop writes it again
    metrics = MetricsLogger(run_dir, cfg.train.steps, cfg.logging.tensorboard, start)
    if metrics.dropped:
        log.info("metrics.jsonl: dropped %d record(s) after step %d, where this attempt starts "
                 "(they were logged after that checkpoint)", metrics.dropped, start)
    return metrics


def _heldout(cfg: Config, tok, layout: ParallelLayout) -> HeldoutLoss | None:
    """The held-out loss of `train.eval_every`, its samples packed now (None: no evaluation)."""
    if not cfg.train.eval_every:
        return None
    heldout = HeldoutLoss(make_loader(cfg, "heldout", tok, shuffle=False), cfg.train.eval_samples,
                          parallel_state.get_data_parallel_rank(), layout.dp,
                          multiple=layout.pp if layout.vpp else 1)
    if is_rank0():
        log.info("held-out loss every %d steps on %d samples of %s/heldout", cfg.train.eval_every,
                 heldout.samples, cfg.data.path)
    return heldout


def _end_early(run_dir: Path, step: int, metrics: MetricsLogger | None,
               diverged: DivergedError | None) -> None:
    """End the run after the save of `step`: raise `diverged` (its weights are the last finite
    update's), else mark the stop for the job script and exit with the requeue status."""
    if metrics:
        metrics.close()
    if diverged:
        raise diverged
    if is_rank0():  # the save is published: a requeue resumes from it
        run_dir.mkdir(parents=True, exist_ok=True)  # a stop before a fresh run's first step
        (run_dir / STOPPED_FILE).write_text(json.dumps({"step": step}) + "\n")
    dist.barrier()  # no rank exits before the file is there: srun's --kill-on-bad-exit ends
    # the others on the first non-zero exit
    raise SystemExit(REQUEUE_EXIT_CODE)  # saved at `step`; the job script requeues


def _finished(cfg: Config, begin: Start) -> bool:
    """Whether the checkpoint the run starts from is at or past train.steps (read from its
    state.json, before the model is built; a state.json that does not read is left to the load)."""
    if begin.checkpoint is None or begin.weights_only:
        return False
    try:
        step = json.loads((begin.checkpoint / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if step >= cfg.train.steps and is_rank0():
        log.warning("%s is at step %d and train.steps is %d: nothing to train", begin.checkpoint,
                    step, cfg.train.steps)
    return step >= cfg.train.steps


def _start(cfg: Config, begin: Start, chunks, optimizer, scheduler, loader
           ) -> tuple[int, int, int]:
    """The step, samples consumed and steps skipped in a row the run starts from (`begin`, of
    `start_point`): a resumed checkpoint's, or 0 after loading only weights
    (checkpoint.init_from) or none."""
    if begin.weights_only:
        begun = _init_weights(begin.checkpoint, chunks, optimizer)
    elif begin.checkpoint:
        try:
            begun = _resume(cfg, begin.checkpoint, chunks, optimizer, scheduler, loader)
        except checkpoint.DamagedCheckpointError as e:
            older = checkpoint.complete_before(begin.checkpoint)
            if older is None:
                raise
            raise checkpoint.CheckpointError(f"{e}; {older} is complete: --resume {older} starts "
                                             f"from it") from None
    else:
        begun = 0, 0, 0
    return begun


def _save(cfg: Config, run_dir: Path, step: int, last: bool, state: tuple, samples_seen: int,
          saves: checkpoint.AsyncSaves | None, skipped_in_a_row: int) -> None:
    """After `step`: publish finished background saves, save a checkpoint at checkpoint.every and
    at the `last` step, and at the last step wait for the saves in flight; `state` is (chunks,
    optimizer, scheduler, loader)."""
    chunks, optimizer, scheduler, loader = state
    with cuda_to_cpu():
        if saves:
            saves.poll()  # publish a background save once every rank has written it
        if last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            checkpoint.save(run_dir, step, chunks, optimizer, scheduler, loader.state_dict(), cfg,
                            samples_seen, cfg.checkpoint.keep, cfg.checkpoint.keep_every, saves,
                            skipped_in_a_row)
        if saves and last:
            saves.close()  # the last save is written and published before the exit


def train(cfg: Config, run_dir: str | Path, resume: str | None = None, fresh: bool = False,
          overwrite: bool = False, preempt: PreemptionHandler | None = None) -> dict:
    """Train per `cfg` into `run_dir`, from its latest checkpoint if it has one (see
    `start_checkpoint` for `resume`, `fresh` and `overwrite`, `start_point` for
    checkpoint.init_from); return the last logged record. `preempt`: a handler the caller
    installed earlier (the CLI does, before its slow imports), else one is installed now; either
    way the process's own handlers are back when this returns or raises."""
    check_trainable(cfg)
    preempt = (preempt or PreemptionHandler()).install()  # SIGTERM/SIGUSR1: save after a step, exit
    try:
        return _train(cfg, Path(run_dir), resume, fresh, overwrite, preempt)
    finally:
        preempt.uninstall()


def _train(cfg: Config, run_dir: Path, resume: str | None, fresh: bool, overwrite: bool,
           preempt: PreemptionHandler) -> dict:
    layout, tok = start_processes(cfg)
    begin = start_point(run_dir, resume, fresh, overwrite, is_rank0(), cfg.checkpoint.init_from)
    if _finished(cfg, begin):  # a requeue of a finished run: nothing built, nothing loaded
        return {}
    check_tokenizer(begin.checkpoint, tok)
    chunks, ddps, optimizer, scheduler = build_state(cfg, tok)
    for line in advisories(cfg) if is_rank0() else ():
        log.warning("%s", line)
    n_micro = cfg.train.global_batch_size // (cfg.data.micro_batch_size * layout.dp)
    loader = make_loader(cfg, "train", tok, parallel_state.get_data_parallel_rank(), layout.dp,
                         slots=cfg.train.global_batch_size // cfg.data.micro_batch_size)  # the
    # global batch is the same under any dp: each of its micro-batches has a packer of its own
    start, consumed, in_a_row = _start(cfg, begin, chunks, optimizer, scheduler, loader)
    if start < cfg.train.steps and preempt.stop_requested(device()):  # during start-up: nothing
        if is_rank0():  # trained since the start point, nothing to save
            log.warning("asked to stop (%s) before the first step: exit %d for a requeue, which "
                        "starts from step %d again", preempt.reason(), REQUEUE_EXIT_CODE, start)
        _end_early(run_dir, start, None, None)
    heldout = _heldout(cfg, tok, layout)
    metrics = _open_run(cfg, run_dir, start, chunks, n_micro) if is_rank0() else None
    batches = CountingIterator(loader)
    record: dict = {}
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
    saves = checkpoint.AsyncSaves() if cfg.checkpoint.async_save else None  # writes in flight
    skipped = SkippedSteps(cfg.train.max_skipped_steps, in_a_row)
    profiler = StepProfiler(cfg.logging.profile_steps, run_dir, dist.get_rank(), cfg.train.steps)
    for step in range(start + 1, cfg.train.steps + 1):
        profiler.begin(step)
        t0 = time.time()
        microbatches = [next(batches) for _ in range(n_micro)]
        lr = optimizer.param_groups[0]["lr"]  # this step's (the schedule then moves on)
        loss, tokens, grad_norm, applied = train_step(ddps, optimizer, microbatches,
                                                      cfg.data.seq_length)
        if applied:
            scheduler.step(1)  # a skipped update leaves the schedule where it is, as megatron does
        diverged = skipped.count(step, applied, loss, grad_norm, tokens)  # the same on every rank
        dt = time.time() - t0
        seen = torch.tensor([batches.samples], dtype=torch.long, device=device())
        dist.all_reduce(seen, group=parallel_state.get_data_parallel_group())
        evaluate = heldout is not None and not diverged and (
            step % cfg.train.eval_every == 0 or step == cfg.train.steps)
        stop = preempt.stop_requested(device())  # agreed by all ranks
        if step % cfg.logging.every == 0 or step in (start + 1, cfg.train.steps) or diverged \
                or evaluate or stop:  # a stop's record keeps the counts since the last one
            data = data_metrics(loader)  # data/packing_efficiency, data/skipped_*, ... (all ranks)
            record = {"step": step, "loss": loss, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                      "samples_seen": consumed + int(seen), "step_time": dt,
                      "skipped_updates": skipped.take(), **data, **memory_metrics()}
            if evaluate:  # after the step's timing; every rank takes part
                record["eval/loss"] = heldout(ddps, cfg.data.seq_length)
            if metrics:
                metrics.log(record)
        profiler.end(step)
        if stop and step < cfg.train.steps and is_rank0():
            log.warning("step %d: asked to stop (%s): saving a checkpoint, then exit %d for a "
                        "requeue", step, preempt.reason(), REQUEUE_EXIT_CODE)
        _save(cfg, run_dir, step, stop or diverged or step == cfg.train.steps,
              (chunks, optimizer, scheduler, loader), consumed + int(seen), saves, skipped.in_a_row)
        if diverged or (stop and step < cfg.train.steps):  # saved above
            profiler.close()
            batches.close()
            _end_early(run_dir, step, metrics, skipped.error(step) if diverged else None)
    profiler.close()
    batches.close()
    if metrics:
        metrics.close()
    return record
