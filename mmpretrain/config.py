"""The job config: one typed tree of dataclasses, loaded strictly from YAML.

Every field carries a one-line docstring (the string literal under it). Unknown keys and wrong
types are `ConfigError`s naming the dotted key; `--set a.b=value` overrides go through the same
checks. The resolved tree is written to the run directory as `config.yaml`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names it."""


@dataclass
class ModelConfig:
    design: Literal["d", "x", "h"] = "d"
    """NVLM design: 'd' decoder-only, 'x' gated cross-attention, 'h' hybrid (thumbnail in stream)."""
    cross_attention_every: int = 0
    """x/h: a gated cross-attention layer before decoder layers k, 2k, 3k, ... (1-based); 0: none."""
    cross_attention_layers: list[int] = field(default_factory=list)
    """x/h: explicit 1-based decoder layers preceded by a cross-attention layer (added to _every)."""
    train_only_cross_attention: bool = False
    """x/h: Flamingo-style, freeze encoder and decoder; train cross-attention layers and projector."""
    cross_attention_gate_lr_mult: float = 1.0
    """x/h: learning-rate multiplier of the tanh gates (at the base lr they open slowly from 0)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of all weight matrices."""
    spec: Literal["local"] = "local"
    """Layer implementation: 'local' (megatron-core modules, CPU and GPU)."""


@dataclass
class VisionConfig:
    num_layers: int = 2
    """Transformer layers of the vision encoder."""
    hidden_size: int = 64
    """Width of the vision encoder."""
    num_attention_heads: int = 4
    """Attention heads of the vision encoder."""
    ffn_hidden_size: int = 128
    """Inner width of the encoder's SwiGLU MLP."""
    patch_size: int = 16
    """Side of a square image patch, in pixels."""
    rope_theta: float = 10000.0
    """Base of the 2-D rotary embedding's frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of the encoder's RMSNorms."""
    freeze: bool = False
    """Keep the vision encoder's weights fixed."""


@dataclass
class ProjectorConfig:
    merge: int = 1
    """Patch merge (pixel shuffle) factor per side: 1 (none) or 2 (2x2 patches become one token)."""
    hidden_size: int | None = None
    """Inner width of the 2-layer GELU MLP; None means the decoder's hidden size."""
    freeze: bool = False
    """Keep the projector's weights fixed."""


@dataclass
class DecoderConfig:
    num_layers: int = 2
    """Transformer layers of the language decoder."""
    hidden_size: int = 128
    """Width of the decoder."""
    num_attention_heads: int = 4
    """Query heads of the decoder."""
    num_query_groups: int = 2
    """Key/value heads (grouped-query attention); equal to the heads for plain multi-head."""
    ffn_hidden_size: int = 256
    """Inner width of the decoder's SwiGLU MLP."""
    rope_theta: float = 10000.0
    """Base of the decoder's rotary embedding."""
    norm_eps: float = 1e-5
    """Epsilon of the decoder's RMSNorms."""
    vocab_size: int | None = None
    """Vocabulary size; None takes it from the dataset's tokenizer."""
    freeze: bool = False
    """Keep the decoder's weights (embeddings and output layer included) fixed."""


@dataclass
class DatasetConfig:
    path: str = ""
    """An MDS shard directory (or a dataset directory holding <split>/), local or a remote URL."""
    weight: float = 1.0
    """Share of the training mixture, relative to the other datasets' weights."""


@dataclass
class DataConfig:
    path: str = "data-synth"
    """Dataset directory holding train/, heldout/ and tokenizer.json (as `data synth` writes)."""
    seq_length: int = 256
    """Length of a packed decoder sequence, in tokens."""
    micro_batch_size: int = 4
    """Packed sequences per micro-batch."""
    image_token_budget: int = 64
    """Largest number of patches one image may take (native-resolution resize)."""
    max_upscale: float = 2.0
    """Largest factor by which a small image may be enlarged."""
    shuffle_seed: int = 0
    """Seed of the sample order."""
    datasets: list[DatasetConfig] = field(default_factory=list)
    """Training mixture of {path, weight}; empty: <path>/train alone."""
    cache_dir: str = ""
    """Local cache for shards of remote datasets; empty: ~/.cache/mmpretrain/shards."""
    cache_limit: str | int = ""
    """Most bytes cache_dir may hold on a node, e.g. "200GB" (2^30 bytes a GB) or a byte count,
    LRU-evicted; "" or 0: none."""
    resize: Literal["native", "tiles"] = "native"
    """Image policy: 'native' (aspect kept, token budget) or 'tiles' (NVLM tiles + thumbnail)."""
    max_image_side: int = 0
    """native: longest image side in pixels after resizing (0: only the token budget caps it)."""
    max_tiles: int = 6
    """tiles: most tiles per image, the thumbnail not counted."""
    tile_size: int = 448
    """tiles: side of a square tile in pixels (a multiple of patch_size x projector.merge)."""
    tile_thumbnail: bool = True
    """tiles: add a global thumbnail after the tiles when there is more than one tile."""
    max_image_pixels: int = 67108864
    """Images with more pixels are skipped before decoding (decompression bombs)."""
    decoder: Literal["auto", "dali", "pillow"] = "auto"
    """Image decoder: 'dali' (GPU 'mixed' or CPU pipeline), 'pillow', 'auto' (DALI on GPU, else Pillow)."""
    workers: int = 0
    """Processes reading, decoding and tokenizing ahead of the packer (0: the training process)."""
    long_samples: Literal["truncate", "drop"] = "truncate"
    """A sample longer than seq_length (or over max_patches): cut its end, or skip it; both counted."""
    max_patches: int = 0
    """Largest encoder stream (patches of all images) of one micro-batch; 0: no limit."""
    pack_buffer: float = 2.0
    """Micro-batches' worth of tokens the best-fit packer holds before forming a micro-batch."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run."""
    global_batch_size: int = 4
    """Packed sequences per optimizer step, over all data-parallel ranks."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Steps of linear warmup."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    clip_grad: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Parameter/compute dtype; 'auto' is bf16 on GPU and fp32 on CPU."""
    seed: int = 1234
    """Seed of initialisation and dropout."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (attention core only) or full (each layer's input kept)."""
    fp8: Literal["hybrid", "e4m3"] | None = None
    """FP8 recipe of the linear layers (Transformer Engine, H100 and newer); null for bf16."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule); None for none."""
    sequence_parallel: bool = False
    """Split the decoder's activations along the sequence over the tensor-parallel group."""
    distributed_optimizer: bool = False
    """Shard optimizer states over the data-parallel group."""
    first_stage_decoder_layers: int | None = None
    """Decoder layers on the first pipeline stage (which also runs the vision encoder); None: even."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (0: only at the end)."""
    keep: int = 2
    """Checkpoints to keep (the newest ones); the one `latest` names is never deleted."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    init_from: str = ""
    """Weights-only start (a checkpoint or a run dir's latest) when the run has no checkpoint yet."""
    async_save: bool = False
    """Write checkpoint tensors in a background process while training goes on (megatron-core)."""


@dataclass
class LoggingConfig:
    every: int = 5
    """Log metrics every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run>/tb."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model design and initialisation."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision encoder."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """Vision-to-language projector."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """Language decoder."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data source and packing."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and console output."""


# ---------------------------------------------------------------- strict conversion


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for inner in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, inner, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(" or ".join(errors))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown key {prefix + str(k)!r} (known: {', '.join(sorted(names))})")
    kwargs = {k: _check_value(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict | None) -> Config:
    """Build a Config from a plain mapping (as read from YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the config file must be a mapping of sections")
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The config as a plain mapping."""
    return dataclasses.asdict(cfg)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` to a plain mapping; the value is read as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse {raw!r}: {e}") from None
    node, cls = data, Config
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            raise ConfigError(f"unknown key {'.'.join(parts[: i + 1])!r} in --set")
        if i == len(parts) - 1:
            node[part] = value
            return
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])!r} is not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])!r} is not a section")


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML job config strictly and apply `dotted.key=value` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the config file must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(data)


def dump(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check_trainable(cfg: Config) -> None:
    """Settings a config may hold (`mmpretrain plan` models them) that training cannot run yet."""
    if cfg.train.fp8 is not None:
        raise ConfigError(
            f"train.fp8: {cfg.train.fp8!r} needs the Transformer Engine layer spec, which this "
            "version does not have (model.spec is 'local' only; issue 9): set train.fp8: null "
            "(`mmpretrain plan` still shows what FP8 would give)")


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
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be positive, got {v}")
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
    if cfg.data.image_token_budget < cfg.projector.merge ** 2:
        raise ConfigError("data.image_token_budget is smaller than one merged token")
    _validate_data(cfg)
    _validate_cross_attention(cfg)


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
