"""DDP wrapping, the megatron optimizer (Adam) and the warmup + cosine LR schedule."""
from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mmpretrain.config import Config


def wrap_ddp(model: torch.nn.Module, cfg: Config) -> DistributedDataParallel:
    """megatron DDP (gradient buckets in fp32) and the schedule hooks on the model's config."""
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer),
        module=model)
    ddp.config.no_sync_func = ddp.no_sync
    ddp.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(ddp: DistributedDataParallel, cfg: Config):
    """Adam (decoupled weight decay) with grad clipping, over the DDP buffers."""
    t = cfg.train
    ocfg = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=1e-8,
        clip_grad=t.clip_grad, bf16=ddp.config.bf16, params_dtype=ddp.config.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    return get_megatron_optimizer(ocfg, [ddp])


def build_scheduler(optimizer, cfg: Config) -> OptimizerParamScheduler:
    """Linear warmup to lr, cosine decay to min_lr at the last step; constant weight decay."""
    t = cfg.train
    warmup = min(t.warmup_steps, t.steps - 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=t.steps, lr_decay_style="cosine", start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant")


def trainable_parameters(model: torch.nn.Module) -> int:
    """Parameters that train on this rank."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
