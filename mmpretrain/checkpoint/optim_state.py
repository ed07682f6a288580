"""The optimizer's side of a checkpoint: the distributed optimizer's save format, and what
megatron-core 0.16.1's optimizers need around Adam to save and load a state exactly, mostly
around torch's Adam (megatron's choice without TE or apex: CPU runs). With TE's FusedAdam only
a state after a skipped first update is filled in (`start_adam_state`; not run on a GPU yet)."""
from __future__ import annotations

from pathlib import Path

import torch

from mmpretrain.checkpoint.optim_checks import check_buckets, check_format, check_groups, misfit
from mmpretrain.config import Config

ADAMS = (torch.optim.Adam, torch.optim.AdamW)  # torch's (TE's FusedAdam needs less of this)


def is_distributed(optimizer) -> bool:
    """Whether `optimizer` is (or chains) megatron's distributed optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer)
               for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def save_format(cfg: Config) -> dict:
    """The optimizer's save format, as megatron's `sharded_state_dict(metadata=...)` takes it
    (and state.json records it): {} without the distributed optimizer, else
    `checkpoint.optimizer_format`. "dp_reshardable" (Megatron-LM's default) resumes at the same
    tp, pp and vpp with any dp; "fully_reshardable" at any layout (its load into torch's Adam
    needs `_load_fully_reshardable`). megatron-core 0.16.1's own default,
    "fully_sharded_model_space", is refused by its torch_dist writer (flattened ranges)."""
    if not cfg.parallel.distributed_optimizer:
        return {}
    return {"distrib_optim_sharding_type": cfg.checkpoint.optimizer_format}


def _adams(optimizer) -> list[torch.optim.Optimizer]:
    """The torch Adam(W) optimizers inside megatron's (chained, distributed or not) optimizer."""
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [o for o in inner if type(o) in ADAMS]


def _step(value: float, p: torch.Tensor, group: dict) -> torch.Tensor:
    """A step tensor as torch's Adam makes it: on the parameter's device when fused or capturable."""
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(value, dtype=torch.float32, device=p.device if on_device else "cpu")


def start_adam_state(optimizer) -> None:
    """Give Adam the state its first update would create where it has none yet, as after a
    first step whose update was skipped: megatron's optimizers cannot save a state that is not
    there (the plain one leaves it out of the checkpoint, which then does not resume; the
    distributed one fails an assertion without TE or apex, also when loading into a fresh one;
    both then ask for moments the checkpoint lacks). torch's Adam gets step 0 and zero moments;
    another (TE's FusedAdam, which keeps its step in the param groups) what megatron's own
    `init_state_fn` gives it before a load. The next update runs as it would have."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(opt, "optimizer", None)
        if adam is None:
            continue
        if type(adam) not in ADAMS:
            if getattr(opt, "init_state_fn", None) is not None:
                opt.init_state_fn(adam, opt.config)  # only where a parameter has no state
            continue
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p].update(step=_step(0.0, p, group), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))
                    if group["amsgrad"]:
                        adam.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)


def _per_optimizer(optimizer, state: dict) -> list[tuple]:
    """(optimizer, its part of `state`) for each chained optimizer, as ChainedOptimizer lays a
    state out: one optimizer's is the state itself, several are keyed by their index."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [state] if len(chained) == 1 else [state[k] for k in sorted(state)]
    return list(zip(chained, parts, strict=True))


def keep_zero_step(sharded: dict, optimizer) -> None:
    """megatron's plain optimizers leave a step of 0 (`start_adam_state`'s) out of the state
    they save (`if step:`), and then cannot load it (torch's Adam needs it): record it, for torch's
    Adam only (TE's FusedAdam keeps its step in its param groups and takes none per parameter)."""
    for opt, part in _per_optimizer(optimizer, sharded):
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
    check_groups(path, meta, optimizer)
    start_adam_state(optimizer)  # the saved state replaces it
    request = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=saved)
    if is_distributed(optimizer):
        check_buckets(path, request)
    return request


def load(optimizer, state: dict, path: Path) -> None:
    """Put the state loaded from checkpoint `path` into the optimizer."""
    deferred = _pop_fully_reshardable(optimizer, state)
    try:
        with torch.no_grad():  # fp32 distributed: the main parameters are views of the weights
            optimizer.load_state_dict(state)
            for opt, param_state in deferred:
                _load_fully_reshardable(opt, param_state)
    except AssertionError as e:  # the distributed optimizer's buffers are laid out otherwise
        if not is_distributed(optimizer):
            raise
        raise misfit(path, str(e) or "megatron-core asserts") from None
    restore_adam_steps(optimizer)


def _pop_fully_reshardable(optimizer, state: dict) -> list[tuple]:
    """(distributed optimizer, its parameter state) for each one around torch's Adam whose
    state in `state` is "fully_reshardable": taken out of `state`, to be loaded on their own."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [(opt, part.pop("param_state")) for opt, part in _per_optimizer(optimizer, state)
            if isinstance(opt, DistributedOptimizer) and type(opt.optimizer) in ADAMS
            and part.get("param_state_sharding_type") == "fully_reshardable"]


def _load_fully_reshardable(opt, param_state: dict) -> None:
    """megatron-core 0.16.1 loads a fully_reshardable state by copying into every tensor of
    torch's Adam state, `step` too, which the saved state has none of (a KeyError): load it
    with the steps set aside (`restore_adam_steps` then gives each parameter the saved one)."""
    steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
    try:
        opt.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step
