"""The one config loader: typed dataclasses from YAML plus dotted `key=value` overrides.

Every tool (trainer, packer, eval, demo) describes its settings as nested dataclasses and loads them
here, so unknown keys, wrong types and bad values give the same one-line error everywhere: the file,
the dotted key, and the closest valid keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value or key; the message names where it came from and what to change."""


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}?"
    return f"valid keys: {', '.join(sorted(valid))}"


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return False, tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Converts `value` (from YAML or a command-line string) to the annotated type `tp`."""
    optional, inner = _is_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {getattr(tp, '__name__', tp)})")
    tp = inner
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple, Sequence):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _k, v_tp = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, v_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value.replace("_", "")) if tp is float else parse_int(value)
            except ValueError:
                raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            value = int(value)
        return tp(value)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def parse_int(text: str) -> int:
    """Accepts 65536, 64K, 512k, 1M, 4_000_000 and 1e6 (sizes and token counts read naturally)."""
    t = text.strip().replace("_", "")
    mult = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(t[-1:].lower())
    if mult:
        return int(float(t[:-1]) * mult)
    return int(float(t)) if ("e" in t.lower() or "." in t) else int(t)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Builds dataclass `cls` from a mapping, rejecting unknown keys with suggestions."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{where}: unknown key '{k}' — {_suggest(k, fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe dict of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict, overrides: Sequence[str], cls: type | None = None) -> dict:
    """Applies `a.b.c=value` strings to a nested dict (values parsed as YAML scalars/lists)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=2e-5")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node, node_cls = data, cls
        for depth, part in enumerate(parts):
            if node_cls is not None and dataclasses.is_dataclass(node_cls):
                names = [f.name for f in dataclasses.fields(node_cls)]
                if part not in names:
                    raise ConfigError(f"override {key!r}: unknown key '{'.'.join(parts[:depth + 1])}' — "
                                      f"{_suggest(part, names)}")
                sub_tp = _is_optional(typing.get_type_hints(node_cls)[part])[1]
                node_cls = sub_tp if dataclasses.is_dataclass(sub_tp) else None
            else:
                node_cls = None
            if depth == len(parts) - 1:
                node[part] = yaml.safe_load(raw) if raw.strip() else ""
            else:
                child = node.get(part)
                child = dict(child) if isinstance(child, Mapping) else {}
                node[part] = child
                node = child
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Loads `cls` from a YAML file (optional) and dotted overrides; errors name file and key."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = dict(loaded)
        where = str(path)
    data = apply_overrides(data, overrides, cls)
    return from_dict(cls, data, where)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
