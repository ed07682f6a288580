"""One optimizer step through megatron-core's schedule, and the loss it reports."""
from __future__ import annotations

import logging
import math
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func

from mmpretrain.parallel import cuda_to_cpu, is_rank0
from mmpretrain.train import DivergedError

log = logging.getLogger(__name__)


class SkippedSteps:
    """Counts the steps whose update was skipped; `limit` of them in a row end the run."""

    def __init__(self, limit: int, in_a_row: int = 0):
        """`in_a_row`: skipped in a row before this attempt (a resumed checkpoint's)."""
        self.limit, self.in_a_row, self.since_record = limit, in_a_row, 0

    def count(self, step: int, applied: bool, loss: float, grad_norm: float,
              tokens: float = 1.0) -> bool:
        """Record one step's outcome (the same on every rank); True when the limit is reached.
        A step with no text token to score (`tokens` 0) is skipped but says nothing about
        divergence: it leaves the count in a row as it was."""
        if applied:
            self.in_a_row = 0
            return False
        self.since_record += 1
        if tokens == 0:
            if is_rank0():
                log.warning("step %d: the global batch has no text token to score, update "
                            "skipped", step)
            return False
        self.in_a_row += 1
        if is_rank0():
            log.warning("step %d: loss %s, gradient norm %s: not finite, update skipped (%d in a "
                        "row)", step, loss, grad_norm, self.in_a_row)
        return self.in_a_row >= self.limit

    def error(self, step: int) -> DivergedError:
        return DivergedError(f"{self.in_a_row} steps in a row (up to step {step}) had a non-finite "
                             f"loss or gradient (train.max_skipped_steps {self.limit}); the "
                             f"checkpoint of step {step} holds the weights of the last finite "
                             f"update and the data position after the skipped batches")

    def take(self) -> int:
        """Skipped updates since the previous call (for a metrics record)."""
        n, self.since_record = self.since_record, 0
        return n


def device() -> torch.device:
    """The device this rank computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def loss_func(loss_mask: torch.Tensor, per_token: torch.Tensor):
    """Sum of the loss over text tokens, the token count, and both for reporting."""
    total = (per_token.float() * loss_mask).sum()
    count = loss_mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}


def forward_step(data_iterator, model):
    """megatron's forward_step_func: next micro-batch -> (per-token loss, loss function)."""
    batch = next(data_iterator).to(device())
    return model(batch), partial(loss_func, batch.loss_mask)


def loss_totals(outputs: list[dict]) -> torch.Tensor:
    """[summed loss, text tokens] over micro-batches and data-parallel ranks, on every rank (only
    the last pipeline stage computes it); a device tensor, queued, not yet waited for."""
    if not outputs:  # not the last pipeline stage
        totals = torch.zeros(2, device=device())
    else:
        totals = torch.stack([o["lm loss"] for o in outputs]).sum(0).float()
    if dist.is_initialized():  # NCCL reduces device tensors only
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return totals


def forward_backward(ddps: list, microbatches: list, seq_len: int, forward_only: bool = False):
    """megatron's schedule (no pipelining, 1F1B or interleaved by the layout) over a step's
    micro-batches; every model chunk reads the same micro-batches in order."""
    iterators = [iter(microbatches) for _ in ddps]
    chunk = getattr(ddps[0], "module", ddps[0])
    rows, cols = chunk.pipeline_shape(seq_len, microbatches[0].tokens.shape[0])
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(ddps) > 1 else iterators[0], model=ddps,
        num_microbatches=len(microbatches), seq_length=rows, micro_batch_size=cols,
        forward_only=forward_only)


def update(optimizer, totals: torch.Tensor) -> tuple[bool, float, float, float]:
    """megatron's optimizer step (main grads, global grad norm, clipping, Adam), skipped when the
    loss or the gradient norm is not finite: with bf16 and fp32 there is no loss scaler to catch
    it, and one NaN step would poison every weight. `totals` (loss_totals) is read after the
    gradient norm, so the host waits for the GPU once, with the main-grad copies already queued.
    Skipped too when the global batch has no text token: its gradients are zero, yet Adam's
    momentum and weight decay would still move the weights (its loss is NaN: nothing was scored).

    Returns (update applied, grad norm before clipping, mean loss per text token, text tokens)."""
    found_inf = optimizer.prepare_grads()
    norm = float(optimizer.get_grad_norm() or 0.0)  # the same on every rank
    total, tokens = totals.tolist()
    loss = total / tokens if tokens else float("nan")
    if found_inf or not tokens or not (math.isfinite(norm) and math.isfinite(loss)):
        return False, norm, loss, tokens
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
        if params and opt.config.clip_grad > 0:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), norm, loss, tokens


def train_step(ddps: list, optimizer, microbatches: list, seq_len: int, after_backward=None):
    """Forward/backward over one step's micro-batches, then the optimizer step (skipped on a
    non-finite loss or gradient). `after_backward()`, if given, runs between them (the reduced
    gradients are in place).

    Returns (loss, text tokens, grad norm, update applied)."""
    for ddp in ddps:
        ddp.zero_grad_buffer()
    optimizer.zero_grad()
    with cuda_to_cpu():
        outputs = forward_backward(ddps, microbatches, seq_len)
        if after_backward is not None:
            after_backward()
        ok, grad_norm, loss, tokens = update(optimizer, loss_totals(outputs))
    return loss, tokens, grad_norm, ok


@torch.no_grad()
def eval_losses(model, batches) -> tuple[float, float]:
    """(summed loss, text tokens) of `model` over an iterable of batches, no grad."""
    total, count = 0.0, 0.0
    with cuda_to_cpu():
        for batch in batches:
            batch = batch.to(device())
            t, n, _ = loss_func(batch.loss_mask, model(batch))
            total, count = total + t.item(), count + n.item()
    return total, count
