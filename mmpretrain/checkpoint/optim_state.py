"""The optimizer's side of a checkpoint: the distributed optimizer's save format, and what
megatron-core 0.16.1's optimizers need around torch's Adam (megatron's choice without TE or
apex: CPU runs) to save and load a state exactly. TE's FusedAdam is not touched (a checkpoint
after a skipped first update is not handled there: not run on a GPU yet)."""
from __future__ import annotations

from pathlib import Path

import torch

from mmpretrain.checkpoint.files import CheckpointError
from mmpretrain.config import Config

ADAMS = (torch.optim.Adam, torch.optim.AdamW)  # torch's; TE's FusedAdam is left alone


def is_distributed(optimizer) -> bool:
    """Whether `optimizer` is (or chains) megatron's distributed optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer)
               for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def save_format(cfg: Config) -> dict:
    """The optimizer's save format, as megatron's `sharded_state_dict(metadata=...)` takes it
    (and state.json records it): {} without the distributed optimizer. The distributed one saves
    as "dp_reshardable" (Megatron-LM's default: each rank writes its own shards, no
    communication), which resumes at the same tp, pp and vpp with any dp. megatron-core 0.16.1's
    other formats fail here: its default "fully_sharded_model_space" is refused by its own
    torch_dist writer (flattened ranges), and "fully_reshardable" does not load into torch's
    Adam (a KeyError for `step`) where TE and apex are absent."""
    if not cfg.parallel.distributed_optimizer:
        return {}
    return {"distrib_optim_sharding_type": "dp_reshardable"}


def check_format(path: Path, meta: dict, distributed: bool, layout: list[int]) -> dict:
    """The saved optimizer format, after checking this run can load it: the same kind of
    optimizer and, for the distributed one, the same tp, pp and vpp; else a CheckpointError."""
    saved = meta.get("optimizer", {})
    kind = saved.get("distrib_optim_sharding_type")
    if bool(kind) != distributed:
        raise CheckpointError(
            f"checkpoint {path} holds the state of {'a distributed' if kind else 'a non-distributed'}"
            f" optimizer, this run has {'a distributed' if distributed else 'a non-distributed'} one:"
            f" resume with parallel.distributed_optimizer={str(bool(kind)).lower()}, or start from "
            f"its weights with a fresh optimizer (checkpoint.init_from)")
    if kind == "dp_reshardable" and meta["layout"][:3] != layout[:3]:
        tp, pp, vpp = meta["layout"][:3]
        raise CheckpointError(
            f"checkpoint {path}: its distributed optimizer's state was saved at tp={tp} pp={pp} "
            f"vpp={vpp} and resumes only there (any dp); resume at that layout, or start from its "
            f"weights with a fresh optimizer (checkpoint.init_from)")
    return saved


def _adams(optimizer) -> list[torch.optim.Optimizer]:
    """The torch Adam(W) optimizers inside megatron's (chained, distributed or not) optimizer."""
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [o for o in inner if type(o) in ADAMS]


def _step(value: float, p: torch.Tensor, group: dict) -> torch.Tensor:
    """A step tensor as torch's Adam makes it: on the parameter's device when fused or capturable."""
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(value, dtype=torch.float32, device=p.device if on_device else "cpu")


def start_adam_state(optimizer) -> None:
    """Give torch's Adam the state its first update would create (step 0, zero moments) where
    it has none yet, as after a first step whose update was skipped: megatron's optimizers
    cannot save a state that is not there (the plain one leaves it out of the checkpoint, which
    then does not resume; the distributed one fails an assertion without TE or apex, also when
    loading into a fresh one). The next update runs as it would have."""
    for adam in _adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p].update(step=_step(0.0, p, group), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))
                    if group["amsgrad"]:
                        adam.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)


def keep_zero_step(sharded: dict, optimizer) -> None:
    """megatron's plain optimizers leave a step of 0 (`start_adam_state`'s) out of the state
    they save (`if step:`), and then cannot load it (torch's Adam needs it): record it, for torch's
    Adam only (TE's FusedAdam keeps its step in its param groups and takes none per parameter)."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = sharded.values() if sharded and all(isinstance(k, int) for k in sharded) else [sharded]
    for part, opt in zip(parts, chained, strict=True):  # one per chained optimizer
        if type(getattr(opt, "optimizer", None)) not in ADAMS:
            continue
        state = part.get("optimizer", part).get("state")  # mixed precision / fp32
        if state and "common_step" not in state:
            state["common_step"] = torch.tensor(0.0)


def restore_adam_steps(optimizer) -> None:
    """After megatron's distributed optimizer (without TE or apex) loaded torch's Adam: give each
    parameter its own step tensor holding the saved step (its param groups hold it). megatron
    loads one step tensor into every parameter's state, which Adam then advances in place once
    per parameter, and then copies the state the request was made with over it."""
    if not is_distributed(optimizer):
        return
    for adam in _adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if "step" in group and "step" in adam.state.get(p, {}):
                    adam.state[p]["step"] = _step(float(group["step"]), p, group)


def to_save(optimizer, model_state: dict, cfg: Config) -> dict:
    """The optimizer's sharded state to save beside `model_state` (the model's)."""
    start_adam_state(optimizer)
    out = optimizer.sharded_state_dict(model_state, metadata=save_format(cfg))
    if not is_distributed(optimizer):
        keep_zero_step(out, optimizer)
    return out


def to_load(optimizer, model_state: dict, path: Path, meta: dict, layout: list[int]) -> dict:
    """The optimizer's request to load from checkpoint `path` (state.json `meta`) at `layout`."""
    saved = check_format(path, meta, is_distributed(optimizer), layout)
    start_adam_state(optimizer)  # the saved state replaces it
    request = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=saved)
    if is_distributed(optimizer):
        _check_buckets(path, request)
    return request


def load(optimizer, state: dict, path: Path) -> None:
    """Put the state loaded from checkpoint `path` into the optimizer."""
    try:
        with torch.no_grad():  # fp32 distributed: the main parameters are views of the weights
            optimizer.load_state_dict(state)
    except AssertionError as e:  # the distributed optimizer's buffers are laid out otherwise
        if not is_distributed(optimizer):
            raise
        raise _misfit(path, str(e) or "megatron-core asserts") from None
    restore_adam_steps(optimizer)


def _misfit(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path}: its distributed optimizer's state does not fit this run's trainable "
        f"parameters ({why}); did a freeze flag, the cross-attention layers or "
        f"parallel.first_stage_decoder_layers change? Resume with the saved config, or start "
        f"from its weights with a fresh optimizer (checkpoint.init_from)")


def _check_buckets(path: Path, request: dict) -> None:
    """The distributed optimizer's buffers (one tensor per bucket) have the saved shapes."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for sh in nested_values(request):
        if not isinstance(sh, ShardedTensor):
            continue
        held = getattr(saved.get(sh.key), "size", None)
        if held is None or tuple(held) != tuple(sh.global_shape):
            raise _misfit(path, f"{sh.key}: saved {list(held) if held else 'none'}, this run "
                                f"{list(sh.global_shape)}")
