"""Typed dataclasses from plain data: the machinery under `llmos_ray.config`.

    build(Config, {"train": {"lr": 3e-4}})          # a Config, or ConfigError naming the key
    set_dotted(raw, "train.lr", 3e-4)                 # what a `train.lr=3e-4` override does
    parse_overrides(["train.lr=3e-4"])                # [("train.lr", 0.0003)], values read as YAML

Unknown keys and wrong types are errors that name the dotted key and the closest valid one; a
field's one-line docstring (the string right below it) is its documentation (`field_docs`).
Nothing here knows which sections a config has: `config.py` says that.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import types
import typing
from typing import Any, Literal, Optional, Union

from llmos_ray.errors import ConfigError


def parse_overrides(overrides) -> list[tuple[str, Any]]:
    """`["a.b=value", ...]` (values parsed as YAML) or `{"a.b": value}` as (dotted key, value) pairs."""

    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
        key, text = item.split("=", 1)
        parsed.append((key.strip(), yaml_value(text, key)))
    return parsed


def yaml_value(text: Any, key: str = "value") -> Any:
    """A command-line value read as YAML (`3e-4`, `[a, b]`, `true`); non-strings pass through."""
    import yaml

    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {text!r} is not valid YAML: {e}") from None


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set `raw["a"]["b"] = value` for key "a.b", creating sections as needed."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def build(cls, raw: Any, prefix: str = "", root=None, synonyms: Optional[dict[str, str]] = None):
    """An instance of dataclass `cls` from nested plain data, rejecting unknown keys and wrong types.
    For an unknown key the hint is: the key of the same name in another section of `root` (default
    `cls`), else the key its name is a common synonym of (`synonyms`, e.g. learning_rate -> lr),
    else the closest spelling."""
    root = root or cls
    where = prefix.rstrip(".") or "config"
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(unknown_key_message(prefix + str(key), [prefix + n for n in names], cls, root,
                                                  synonyms or {}))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, f"{prefix}{key}.", root, synonyms)
        else:
            kwargs[key] = coerce(value, hint, prefix + key)
    return cls(**kwargs)


def unknown_key_message(key: str, valid: list[str], cls, root, synonyms: Optional[dict[str, str]] = None) -> str:
    section, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    every = all_keys(root)
    elsewhere = [k for k in every if k.endswith("." + leaf)]  # train.zero_stage -> deepspeed.zero_stage
    meant = (synonyms or {}).get(leaf)
    synonym = [k for k in every if meant and k.endswith("." + meant)]  # train.learning_rate -> train.lr
    here = [k for k in synonym if k.startswith(section + ".")]
    close = here or elsewhere or synonym or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    names = ", ".join(v.rsplit(".", 1)[-1] for v in valid)
    return f"unknown config key {key!r}{hint} (valid keys of {cls.__name__}: {names})"


def all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted leaf key of dataclass `cls`, e.g. 'train.lr'."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(hint))}]"
    return getattr(hint, "__name__", str(hint))


def coerce(value: Any, hint, key: str):
    """Return `value` checked against the type `hint` (ints are accepted for floats), or raise
    ConfigError naming `key`, the expected type and what was given."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def bad():
        return ConfigError(f"{key}: expected {type_name(hint)}, got {type(value).__name__} {value!r}")

    if hint is Any:
        return value
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise bad()
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad()
    if origin is list:
        if isinstance(value, str):  # a single path where a list is expected: accept it
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a run name of 7 is fine as "7"
        raise bad()
    raise bad()


def field_docs(cls) -> dict[str, str]:
    """{'train.lr': 'Peak learning rate (AdamW).', ...} read from the fields' docstrings of `cls`
    and its nested dataclasses (inherited fields included, bases first)."""
    docs: dict[str, str] = {}
    classes: dict[str, ast.ClassDef] = {}

    def parse(klass) -> None:
        module = inspect.getmodule(klass)
        for node in ast.parse(inspect.getsource(module)).body:
            if isinstance(node, ast.ClassDef):
                classes.setdefault(f"{module.__name__}.{node.name}", node)

    def walk(klass, prefix: str) -> None:
        for k in klass.__mro__:
            if dataclasses.is_dataclass(k) and f"{k.__module__}.{k.__name__}" not in classes:
                parse(k)
        body = [stmt for k in reversed(klass.__mro__) if f"{k.__module__}.{k.__name__}" in classes
                for stmt in classes[f"{k.__module__}.{k.__name__}"].body]
        hints = typing.get_type_hints(klass)
        for stmt, nxt in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
                doc = ""
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    doc = str(nxt.value.value)
                docs[prefix + name] = doc
                if dataclasses.is_dataclass(hints.get(name)):
                    walk(hints[name], f"{prefix}{name}.")

    walk(cls, "")
    return docs

