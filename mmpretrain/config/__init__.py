"""The job config: one typed tree of dataclasses, loaded strictly from YAML.

Every field carries a one-line docstring (the string literal under it). Unknown keys and wrong
types are `ConfigError`s naming the dotted key; `--set a.b=value` overrides go through the same
checks. The resolved tree is written to the run directory as `config.yaml`.

    tree.py    the sections (dataclasses) and ConfigError
    parse.py   load / from_dict / apply_override / dump
    checks.py  validate, check_trainable, advisories, layer_spec_name, decoder_thd, cross_attention_positions,
               FP8_MULTIPLE
"""
from mmpretrain.config.checks import (
    FP8_MULTIPLE,
    advisories,
    check_trainable,
    cross_attention_positions,
    decoder_thd,
    layer_spec_name,
    validate,
)
from mmpretrain.config.parse import apply_override, dump, from_dict, load, to_dict
from mmpretrain.config.tree import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DatasetConfig,
    DecoderConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    ProjectorConfig,
    TrainConfig,
    VisionConfig,
)

__all__ = [
    "FP8_MULTIPLE",
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DatasetConfig", "DecoderConfig",
    "LoggingConfig", "ModelConfig", "ParallelConfig", "ProjectorConfig", "TrainConfig",
    "VisionConfig", "advisories", "apply_override", "check_trainable", "cross_attention_positions",
    "decoder_thd", "dump", "from_dict", "layer_spec_name", "load", "to_dict", "validate",
]
