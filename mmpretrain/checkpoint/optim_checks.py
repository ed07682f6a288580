"""What a run must share with the checkpoint whose optimizer state it loads, checked before
megatron-core loads it (whose own failures are a KeyError, an AssertionError or a shape error
deep in its loader): the kind of optimizer and, for the distributed one's dp_reshardable
format, the layout; the parameter groups; the distributed optimizer's buffers."""
from __future__ import annotations

from pathlib import Path

from mmpretrain.checkpoint.files import CheckpointError


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
            f"vpp={vpp} and resumes only there (any dp); resume at that layout (with "
            f"checkpoint.optimizer_format=fully_reshardable its next checkpoint resumes at any), or "
            f"start from its weights with a fresh optimizer (checkpoint.init_from)")
    return saved


def group_ids(optimizer) -> list[list]:
    """The identities megatron-core matches saved parameter groups to the run's by (weight-decay
    and learning-rate multipliers, ...), sorted; every rank holds the same groups."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys as keys

    groups = [g for o in getattr(optimizer, "chained_optimizers", [optimizer])
              for g in o.param_groups]
    return [list(ids) for ids in sorted({tuple(g.get(k) for k in keys) for g in groups})]


def check_groups(path: Path, meta: dict, optimizer) -> None:
    """The run's parameter groups are the saved ones (state.json "optimizer_groups", when the
    checkpoint records them), else a CheckpointError: megatron-core's load fails otherwise."""
    saved = meta.get("optimizer_groups")
    if saved is None:
        return
    now = group_ids(optimizer)
    if sorted(map(list, saved)) != now:
        raise CheckpointError(
            f"checkpoint {path}: its optimizer's parameter groups (weight-decay multiplier, "
            f"learning-rate multiplier, ...) are {saved}, this run's {now}; megatron-core matches "
            f"the saved state to the run's by them. Did model.cross_attention_gate_lr_mult change? "
            f"Resume with the saved value, or start from its weights with a fresh optimizer "
            f"(checkpoint.init_from)")


PARTS = {"vision": "the vision encoder", "projector": "the projector", "decoder": "the decoder",
         "xattn": "the cross-attention layers"}


def trains(cfg) -> dict[str, bool]:
    """Which parts of the model train (state.json "trains"): the freeze flags and
    model.train_only_cross_attention, as the model's build applies them."""
    import dataclasses

    from mmpretrain.planner.params import Trains

    return dataclasses.asdict(Trains.of(cfg))


def check_trains(path: Path, meta: dict, cfg) -> None:
    """The parts that train are the saved ones (when the checkpoint records them), else a
    CheckpointError naming each change: the optimizer's state belongs to the saved parameters
    (a distributed optimizer's buffers of equal size would even load onto others)."""
    saved = meta.get("trains")
    if saved is None:
        return
    now = trains(cfg)
    changed = [f"{PARTS.get(k, k)} {'trained' if saved.get(k) else 'was frozen'} when saved and "
               f"{'trains' if on else 'is frozen'} now" for k, on in now.items() if saved.get(k) != on]
    if changed:
        raise CheckpointError(
            f"checkpoint {path}: its optimizer's state belongs to other trainable parameters: "
            f"{'; '.join(changed)} (vision.freeze, projector.freeze, decoder.freeze, "
            f"model.train_only_cross_attention). Resume with the saved settings, or start from its "
            f"weights with a fresh optimizer (checkpoint.init_from)")


def misfit(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path}: its distributed optimizer's state does not fit this run's trainable "
        f"parameters ({why}); did a freeze flag, the cross-attention layers or "
        f"parallel.first_stage_decoder_layers change? Resume with the saved config, or start "
        f"from its weights with a fresh optimizer (checkpoint.init_from)")


def check_buckets(path: Path, request: dict) -> None:
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
            raise misfit(path, f"{sh.key}: saved {list(held) if held else 'none'}, this run "
                                f"{list(sh.global_shape)}")
