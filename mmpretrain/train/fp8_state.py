"""Transformer Engine's delayed FP8 scaling state, kept unchanged across forward passes that
must not train it (the held-out evaluation): FP8 casts record their inputs' amax into the
current row of each amax history even without gradients, and the next training step's scale
update would take those in."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch


def fp8_scaling_tensors(modules) -> list[torch.Tensor]:
    """Transformer Engine's delayed-scaling state of the forward pass: each TE module's amax
    history and scales in `modules` (`fp8_meta["scaling_fwd"]`) and every forward state TE has
    registered for its amax reduction, which also holds that of its operation fuser's ops
    (`model.te_fused_mlp`; they are not submodules). None for other layers and recipes."""
    out = []
    for root in modules:
        for m in root.modules():
            meta = getattr(m, "fp8_meta", None)
            state = meta.get("scaling_fwd") if isinstance(meta, dict) else None
            out += [getattr(state, k) for k in ("amax_history", "scale") if hasattr(state, k)]
    out += _te_registered_forward_scaling()
    unique = {id(t): t for t in out}
    return list(unique.values())


def _te_registered_forward_scaling() -> list[torch.Tensor]:
    """The forward amax histories and scales in TE's global delayed-scaling buffers, when TE is
    in use (imported)."""
    managers = (getattr(sys.modules.get(name), "FP8GlobalStateManager", None)
                for name in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"))
    manager = next((m for m in managers if m is not None), None)
    if manager is None:
        return []
    return [t for buffer in (manager.global_amax_history_buffer, manager.global_scale_buffer)
            for key, tensors in buffer.items() if manager.split_key_in_buffer(key)[0]
            for t in tensors]


@contextmanager
def fp8_scaling_kept(modules):
    """Restores the delayed-scaling state of `modules` (fp8_scaling_tensors) after the block, in
    place: TE's quantizers and amax buffers hold views of these tensors."""
    saved = [(t, t.clone()) for t in fp8_scaling_tensors(modules)]
    try:
        yield
    finally:
        for t, copy in saved:
            t.copy_(copy)
