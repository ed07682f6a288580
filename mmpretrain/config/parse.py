"""Loading, overriding and writing a config: strict (unknown keys and wrong types are
ConfigErrors naming the dotted key), then validated as a whole."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mmpretrain.config.checks import validate
from mmpretrain.config.tree import Config, ConfigError


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
        hint = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint) and not isinstance(value, dict):
                raise ConfigError(f"--set {key}: {key!r} is a section: expected a mapping of its "
                                  f"settings, got {value!r}")
            node[part] = value
            return
        cls = hint
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])!r} is not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])!r} holds {node!r} (from "
                              f"the config file), not a mapping of its settings")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what a YAML error is, on one line."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {problem or str(e).splitlines()[0]}"


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
            raise ConfigError(f"{p}: not valid YAML{_yaml_problem(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not a UTF-8 text file ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the config file must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(data)


def dump(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
