"""DDP wrapping, the megatron optimizer (Adam) and the LR schedule (warmup, then a decay)."""
from __future__ import annotations

import logging

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mmpretrain.config import Config
from mmpretrain.parallel import is_rank0

log = logging.getLogger("mmpretrain")


def wrap_ddp(chunks: list[torch.nn.Module], cfg: Config) -> list[DistributedDataParallel]:
    """megatron DDP per model chunk (gradient buckets in fp32), and the schedule's hooks on the
    chunks' shared config."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    ddps = [DistributedDataParallel(chunk.config, ddp_config, module=chunk,
                                    disable_bucketing=i > 0)  # as megatron does for later chunks
            for i, chunk in enumerate(chunks)]
    config = ddps[0].config
    no_sync = [d.no_sync for d in ddps]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddps


def build_optimizer(ddps: list[DistributedDataParallel], cfg: Config):
    """Adam (decoupled weight decay) with grad clipping, over the DDP buffers."""
    t = cfg.train
    ocfg = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=1e-8,
        clip_grad=t.clip_grad, bf16=ddps[0].config.bf16, params_dtype=ddps[0].config.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    return get_megatron_optimizer(ocfg, ddps, config_overrides=param_overrides(ocfg, cfg))


def param_overrides(ocfg: OptimizerConfig, cfg: Config) -> dict:
    """megatron's standard overrides (no weight decay on biases and 1-D parameters), and the
    learning rate of the cross-attention gates (X/H) scaled by model.cross_attention_gate_lr_mult."""
    overrides = get_standard_config_overrides(ocfg)
    mult = cfg.model.cross_attention_gate_lr_mult
    if cfg.model.design != "d" and mult != 1.0:
        # max_lr/min_lr scale the schedule; lr_mult (unused by the schedule) keeps the group's
        # identity, (wd_mult, lr_mult, ...), apart from the other no-weight-decay parameters' when
        # megatron matches saved optimizer groups to the model's on load.
        overrides[ParamKey(name="*_gate")] = {"max_lr": cfg.train.lr * mult,
                                              "min_lr": cfg.train.min_lr * mult, "lr_mult": mult}
    return overrides


DECAY_STYLES = {"cosine": "cosine", "linear": "linear", "wsd": "WSD", "constant": "constant"}


def build_scheduler(optimizer, cfg: Config) -> OptimizerParamScheduler:
    """Linear warmup to lr, then train.lr_decay (cosine by default) to min_lr; constant weight
    decay. The update of step n (1-based) uses the schedule at n - 1, as in megatron: the first
    update of a warmup is at lr 0, and the last one, at train.steps, at min_lr (lr for
    'constant'). On resume the config's schedule holds (a run extended or its lr changed), not the
    saved one."""
    t = cfg.train
    decay = max(t.steps - 1, 1)
    warmup = min(t.warmup_steps, decay - 1)
    if warmup < t.warmup_steps and is_rank0():
        log.warning("train.warmup_steps %d: a run of %d steps warms up over %d (the schedule "
                    "needs a step after the warmup)", t.warmup_steps, t.steps, warmup)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=DECAY_STYLES[t.lr_decay],
        wsd_decay_steps=t.wsd_decay_steps or None, lr_wsd_decay_style=t.wsd_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def trainable_parameters(chunks: list[torch.nn.Module]) -> int:
    """Parameters that train on this rank."""
    return sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
