"""One optimizer step through megatron-core's schedule, and the loss it reports."""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mmpretrain.parallel import cuda_to_cpu


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


def reduce_losses(outputs: list[dict]) -> tuple[float, float]:
    """(mean loss per text token, text tokens) over micro-batches and data-parallel ranks,
    known on every rank (only the last pipeline stage computes it)."""
    if not outputs:  # not the last pipeline stage
        totals = torch.zeros(2, device=device())
    else:
        totals = torch.stack([o["lm loss"] for o in outputs]).sum(0).float()
    if dist.is_initialized():  # NCCL reduces device tensors only
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss, tokens = totals.tolist()
    return loss / max(tokens, 1.0), tokens


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


def train_step(ddps: list, optimizer, microbatches: list, seq_len: int, after_backward=None):
    """Forward/backward over one step's micro-batches, then the optimizer step.
    `after_backward()`, if given, runs between them (the reduced gradients are in place).

    Returns (loss, text tokens, grad norm, update applied)."""
    for ddp in ddps:
        ddp.zero_grad_buffer()
    optimizer.zero_grad()
    with cuda_to_cpu():
        outputs = forward_backward(ddps, microbatches, seq_len)
        if after_backward is not None:
            after_backward()
        ok, grad_norm, _ = optimizer.step()
    loss, tokens = reduce_losses(outputs)
    return loss, tokens, float(grad_norm or 0.0), bool(ok)


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
