"""Checks of a whole config (sizes, divisibility, designs, data settings), each a ConfigError
naming the setting."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from mmpretrain.config.tree import Config, ConfigError

FP8_MULTIPLE = 16
"""FP8 GEMMs take token (row) counts in multiples of this: the decoder's sequence, the encoder's
patch stream and the cross-attention keys are sized or padded to it under train.fp8."""

PROFILE_MAX_STEPS = 20
"""The longest `logging.profile_steps` window: torch.profiler keeps every op (with shapes) of the
window in host memory until it ends, and a trace of a few steps shows what a step spends."""


def check_trainable(cfg: Config) -> None:
    """Settings a config may hold (`mmpretrain plan` models them) that cannot run here: the TE
    spec (or its options: gradient accumulation fusion, the fused MLP) without Transformer Engine
    or CUDA, FP8 without it or on a GPU without FP8."""
    spec = layer_spec_name(cfg)
    decoder_thd(cfg, spec)
    for name, on in (("train.gradient_accumulation_fusion", cfg.train.gradient_accumulation_fusion),
                     ("model.te_fused_mlp", cfg.model.te_fused_mlp)):
        if on and spec != "te":
            raise ConfigError(f"{name}: Transformer Engine's layers do it, and this run has the "
                              f"{spec} spec: {_te_reason()}")
    if cfg.train.fp8 is None:
        return
    if spec != "te":
        raise ConfigError(f"train.fp8: {cfg.train.fp8!r} runs on Transformer Engine layers "
                          f"(model.spec te), and this run has the {spec} spec: {_te_reason()}")
    from mmpretrain.model.te_specs import fp8_unavailable

    reason = fp8_unavailable(cfg.train.fp8_recipe)
    if reason:
        raise ConfigError(f"train.fp8_recipe: {cfg.train.fp8_recipe!r} cannot run here: {reason}")


def advisories(cfg: Config) -> list[str]:
    """Settings that run but are likely not what was meant, one line each (logged at start)."""
    m, out = cfg.model, []
    if m.design in ("x", "h") and cfg.decoder.freeze and not m.train_only_cross_attention:
        out.append("decoder.freeze also freezes the cross-attention layers (they are part of the "
                   "decoder), so their gates stay where they start (closed when new): set "
                   "model.train_only_cross_attention: true to train them")
    if cfg.checkpoint.optimizer_format != "dp_reshardable" and not cfg.parallel.distributed_optimizer:
        out.append(f"checkpoint.optimizer_format: {cfg.checkpoint.optimizer_format} is the "
                   "distributed optimizer's format; without parallel.distributed_optimizer the "
                   "optimizer's state is saved by parameter and resumes at any layout anyway")
    return out


def _te_reason() -> str:
    from mmpretrain.model.te_specs import te_unavailable

    return te_unavailable() or "Transformer Engine is available (set model.spec: te or auto)"


def layer_spec_name(cfg: Config) -> str:
    """'te' or 'local': model.spec, with 'auto' resolved on this machine."""
    from mmpretrain.model.te_specs import te_unavailable

    spec = cfg.model.spec
    if spec == "local":
        return spec
    reason = te_unavailable()
    if spec == "te" and reason:
        raise ConfigError(f"model.spec: 'te' needs Transformer Engine on CUDA: {reason} "
                          "(model.spec: local runs anywhere)")
    return "local" if reason else "te"


def decoder_thd(cfg: Config, spec: str) -> bool:
    """Whether the decoder's packed samples attend as thd sequences (else a dense mask)."""
    mode = cfg.model.packed_attention
    if mode == "mask" and spec == "te":
        raise ConfigError("model.packed_attention: 'mask' needs model.spec local (Transformer "
                          "Engine's attention takes thd packed sequences)")
    return mode == "thd" or (mode == "auto" and spec == "te")


def validate(cfg: Config) -> None:
    """Checks across fields that the types cannot express."""
    positive = {
        "vision.num_layers": cfg.vision.num_layers, "vision.hidden_size": cfg.vision.hidden_size,
        "vision.patch_size": cfg.vision.patch_size, "decoder.num_layers": cfg.decoder.num_layers,
        "decoder.hidden_size": cfg.decoder.hidden_size, "data.seq_length": cfg.data.seq_length,
        "data.micro_batch_size": cfg.data.micro_batch_size, "train.steps": cfg.train.steps,
        "train.global_batch_size": cfg.train.global_batch_size,
        "data.image_token_budget": cfg.data.image_token_budget,
        "parallel.tp": cfg.parallel.tp, "parallel.pp": cfg.parallel.pp,
        "logging.every": cfg.logging.every, "train.max_skipped_steps": cfg.train.max_skipped_steps,
    }
    for sec in ("vision", "decoder"):
        for name in ("ffn_hidden_size", "num_attention_heads"):
            positive[f"{sec}.{name}"] = getattr(getattr(cfg, sec), name)
    positive["decoder.num_query_groups"] = cfg.decoder.num_query_groups
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be positive, got {v}")
    if cfg.train.eval_every and cfg.train.eval_samples <= 0:
        raise ConfigError(f"train.eval_samples: must be positive when train.eval_every is set, "
                          f"got {cfg.train.eval_samples}")
    for key, v in {"train.warmup_steps": cfg.train.warmup_steps, "train.lr": cfg.train.lr,
                   "train.eval_every": cfg.train.eval_every,
                   "train.min_lr": cfg.train.min_lr, "model.init_std": cfg.model.init_std,
                   "checkpoint.every": cfg.checkpoint.every, "checkpoint.keep": cfg.checkpoint.keep,
                   "checkpoint.keep_every": cfg.checkpoint.keep_every}.items():
        if v < 0:
            raise ConfigError(f"{key}: must not be negative, got {v}")
    if cfg.train.lr_decay == "wsd":
        decay = max(cfg.train.steps - 1, 1)  # the schedule's, as train/optim.py builds it
        most = decay - min(cfg.train.warmup_steps, decay - 1)  # the steps after the warmup
        if not 0 < cfg.train.wsd_decay_steps <= most:
            raise ConfigError(f"train.wsd_decay_steps: train.lr_decay 'wsd' needs 1 to {most} "
                              f"steps of final decay after the warmup (train.steps "
                              f"{cfg.train.steps}, warmup_steps {cfg.train.warmup_steps}), got "
                              f"{cfg.train.wsd_decay_steps}")
    steps = cfg.logging.profile_steps
    if steps and not (len(steps) == 2 and 1 <= steps[0] <= steps[1]):
        raise ConfigError(f"logging.profile_steps: [first, last] with 1 <= first <= last, or [], "
                          f"got {steps}")
    if steps and steps[1] - steps[0] + 1 > PROFILE_MAX_STEPS:
        raise ConfigError(f"logging.profile_steps {steps}: at most {PROFILE_MAX_STEPS} steps (the "
                          f"profiler holds every op of the window in host memory until it ends; "
                          f"{steps[1] - steps[0] + 1} asked)")
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"train.min_lr {cfg.train.min_lr} is above train.lr {cfg.train.lr}")
    if cfg.projector.merge not in (1, 2):
        raise ConfigError(f"projector.merge: must be 1 or 2, got {cfg.projector.merge}")
    for sec in ("vision", "decoder"):
        c = getattr(cfg, sec)
        if c.hidden_size % c.num_attention_heads:
            raise ConfigError(f"{sec}.hidden_size {c.hidden_size} is not divisible by "
                              f"{sec}.num_attention_heads {c.num_attention_heads}")
    head_dim = cfg.vision.hidden_size // cfg.vision.num_attention_heads
    if head_dim % 4:
        raise ConfigError(f"vision head dim {head_dim} must be a multiple of 4 for 2-D RoPE")
    d = cfg.decoder
    if d.num_attention_heads % d.num_query_groups:
        raise ConfigError(f"decoder.num_attention_heads {d.num_attention_heads} is not divisible by "
                          f"decoder.num_query_groups {d.num_query_groups}")
    if cfg.train.fp8 is not None and cfg.data.seq_length % FP8_MULTIPLE:
        raise ConfigError(f"data.seq_length {cfg.data.seq_length} must be a multiple of "
                          f"{FP8_MULTIPLE} for FP8 (train.fp8): FP8 GEMMs take token counts in "
                          f"multiples of {FP8_MULTIPLE}")
    if cfg.data.image_token_budget < cfg.projector.merge ** 2:
        raise ConfigError("data.image_token_budget is smaller than one merged token")
    if cfg.model.te_fused_mlp and cfg.train.fp8 is not None and cfg.train.recompute == "full":
        raise ConfigError("model.te_fused_mlp: not with train.fp8 and train.recompute: full (TE's "
                          "operation fuser does not keep the FP8 scales of the first forward pass "
                          "for the recomputed one, as TE's layers do)")
    _validate_data(cfg)
    _validate_cross_attention(cfg)
    _validate_numbers(cfg)


def _floats(node, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every float setting of a config (sections, lists of sections)."""
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if dataclasses.is_dataclass(v):
            yield from _floats(v, f"{prefix}{f.name}.")
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if dataclasses.is_dataclass(item):
                    yield from _floats(item, f"{prefix}{f.name}[{i}].")
        elif isinstance(v, float):
            yield f"{prefix}{f.name}", v


def _validate_numbers(cfg: Config) -> None:
    """Every float finite; the optimizer's and the models' numbers in their ranges."""
    for key, v in _floats(cfg):
        if not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, got {v}")
    t = cfg.train
    for key, v in {"train.weight_decay": t.weight_decay, "train.clip_grad": t.clip_grad}.items():
        if v < 0:
            raise ConfigError(f"{key}: must not be negative, got {v}")
    for key, v in {"train.adam_beta1": t.adam_beta1, "train.adam_beta2": t.adam_beta2}.items():
        if not 0 <= v < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {v}")
    for key, v in {"vision.rope_theta": cfg.vision.rope_theta,
                   "decoder.rope_theta": cfg.decoder.rope_theta,
                   "data.max_upscale": cfg.data.max_upscale}.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be positive, got {v}")
    for key, v in {"decoder.vocab_size": cfg.decoder.vocab_size,
                   "projector.hidden_size": cfg.projector.hidden_size}.items():
        if v is not None and v <= 0:
            raise ConfigError(f"{key}: must be positive (or null), got {v}")


def cross_attention_positions(cfg: Config) -> list[int]:
    """Sorted 1-based decoder layers that a gated cross-attention layer precedes (x/h designs)."""
    m, n = cfg.model, cfg.decoder.num_layers
    every = range(m.cross_attention_every, n + 1, m.cross_attention_every) \
        if m.cross_attention_every > 0 else []
    return sorted(set(every) | set(m.cross_attention_layers))


def _validate_cross_attention(cfg: Config) -> None:
    """x/h need cross-attention layers at valid positions; h needs tiled images."""
    m = cfg.model
    if m.cross_attention_every < 0:
        raise ConfigError(f"model.cross_attention_every: must be >= 0, got {m.cross_attention_every}")
    bad = [k for k in m.cross_attention_layers if not 1 <= k <= cfg.decoder.num_layers]
    if bad:
        raise ConfigError(f"model.cross_attention_layers: {bad} outside 1..decoder.num_layers")
    if m.design in ("x", "h") and not cross_attention_positions(cfg):
        raise ConfigError(f"model.design={m.design} needs model.cross_attention_every or "
                          "model.cross_attention_layers")
    if m.design == "h" and cfg.data.resize != "tiles":
        raise ConfigError("model.design=h needs data.resize=tiles (thumbnail in stream, tiles "
                          "through cross-attention)")
    if m.design in ("x", "h") and cfg.parallel.pp > 1 and cfg.data.max_patches <= 0:
        raise ConfigError(f"model.design={m.design} with parallel.pp > 1 needs data.max_patches > 0: "
                          "the image context travels between pipeline stages in rows sized for "
                          "data.max_patches / projector.merge^2 image tokens per micro-batch")
    if m.train_only_cross_attention and m.design == "d":
        raise ConfigError("model.train_only_cross_attention needs model.design x or h")


def _validate_data(cfg: Config) -> None:
    """Checks of the data section (image policy, mixture, packing)."""
    d, unit = cfg.data, cfg.vision.patch_size * cfg.projector.merge
    if d.resize == "tiles" and (d.tile_size <= 0 or d.tile_size % unit):
        raise ConfigError(f"data.tile_size {d.tile_size} is not a positive multiple of "
                          f"vision.patch_size x projector.merge = {unit}")
    if not 1 <= d.max_tiles <= 12:
        raise ConfigError(f"data.max_tiles: must be 1..12 (the tokenizer's tile tags), got {d.max_tiles}")
    for i, ds in enumerate(d.datasets):
        if not ds.path or ds.weight <= 0:
            raise ConfigError(f"data.datasets[{i}]: needs a path and a positive weight, got {ds}")
    if d.workers < 0 or d.max_patches < 0 or d.pack_buffer < 1 or d.max_image_pixels <= 0:
        raise ConfigError("data.workers/max_patches must be >= 0, data.pack_buffer >= 1, "
                          "data.max_image_pixels > 0")
    if d.cache_limit not in ("", 0):  # checked at load, not only once remote data are opened
        from mmpretrain.data.cache import parse_size

        try:
            parse_size(d.cache_limit)
        except ValueError as e:
            raise ConfigError(str(e)) from None
