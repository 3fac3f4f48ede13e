"""Typed dataclass configs from nested mappings (JSON / TOML) and ``key.sub=value`` overrides.

``from_dict(cls, tree)`` builds dataclass ``cls`` from a nested mapping, checking and converting every
value to its annotation (unions, literals, tuples, nested dataclasses); unknown keys fail with the
list of known ones. ``apply_override(tree, cls, "a.b=value")`` sets one value in the mapping, typed
by ``cls`` (the text is read as JSON first, so numbers, lists and null work). ``to_plain(obj)`` turns
a config back into JSON-able dicts and lists. Used by the training config (``sdfsmis.train``).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _coerce(obj: Any, tp: Any, where: str) -> Any:
    """Check/convert ``obj`` (from JSON, TOML or an override) to the annotated type ``tp``."""
    bad = ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {obj!r}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return obj
    if _is_union(tp):
        if obj is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        exact = [a for a in members if isinstance(a, type) and type(obj) is a]
        for member in exact + [a for a in members if a not in exact]:
            try:
                return _coerce(obj, member, where)
            except ValueError:
                continue
        raise bad
    if origin is Literal:
        if obj in args:
            return obj
        raise ValueError(f"{where}: expected one of {list(args)}, got {obj!r}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(obj) and isinstance(obj, tp):
            return obj
        if not isinstance(obj, Mapping):
            raise bad
        return from_dict(tp, obj, where)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(obj, str):
            obj = [s.strip() for s in obj.split(",") if s.strip()]
        if not isinstance(obj, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(obj) != len(args):
                raise bad
            return tuple(_coerce(o, a, f"{where}[{i}]") for i, (o, a) in enumerate(zip(obj, args)))
        item = args[0] if args else Any
        out = [_coerce(o, item, f"{where}[{i}]") for i, o in enumerate(obj)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(obj, Mapping):
            raise bad
        return dict(obj)
    number = isinstance(obj, (int, float)) and not isinstance(obj, bool)
    try:
        if tp is bool and isinstance(obj, str) and obj.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[obj.lower()]
        if tp is float and (number or isinstance(obj, str)):
            return float(obj)
        if tp is int and (isinstance(obj, str) or (number and float(obj).is_integer())):
            return int(obj)
        if tp in (str, Path) and isinstance(obj, (str, Path)):
            return tp(obj)
        if tp not in (int, float, str, Path) and (not isinstance(tp, type) or isinstance(obj, tp)):
            return obj
    except ValueError:
        pass
    raise bad


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) mapping, typing every value; unknown keys fail."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                         f"known in {where or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where or cls.__name__}: {err}") from err


def _parse_override_value(text: str, tp: Any, where: str) -> Any:
    """An override's text as a value of ``tp``: JSON first (numbers, lists, null), else the raw text."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = text
    try:
        return _coerce(parsed, tp, where)
    except ValueError:
        if parsed is text:
            raise
        return _coerce(text, tp, where)


def apply_override(tree: dict, cls: type, override: str) -> None:
    """Apply one ``key.sub=value`` override onto the nested dict ``tree`` (typed via ``cls``)."""
    key, sep, text = override.removeprefix("--").partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {override!r} is not of the form key.sub=value")
    parts = key.strip().split(".")
    node, tp = tree, cls
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            raise ValueError(f"override {override!r}: {'.'.join(parts[:depth])} has no sub-keys")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise ValueError(f"override {override!r}: unknown key {'.'.join(parts[:depth + 1])}; "
                             f"known: {', '.join(sorted(hints))}")
        tp = hints[part]
        if depth < len(parts) - 1:
            sub = node.get(part)
            if dataclasses.is_dataclass(sub):
                sub = to_plain(sub)
            node[part] = sub if isinstance(sub, dict) else {}
            node = node[part]
    node[parts[-1]] = _parse_override_value(text, tp, key)


def to_plain(obj: Any) -> Any:
    """Dataclasses/paths/tuples -> JSON-able dicts, strings and lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
