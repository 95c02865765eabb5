"""Typed settings with declared ranges and choices, checked in one place.

A settings class is a dataclass whose fields are declared with `setting(default, doc, ...)`:

    lr: float = setting(1e-3, "peak learning rate", gt=0)
    scheduler: str = setting("cosine", "learning-rate schedule", choices=("cosine", "constant"))

`parse_section(values, Cls, "optim")` merges `values` onto the class with OmegaConf (unknown keys
and wrong types are rejected there), builds the object and checks every declared range and choice;
each fault is one `UserError` naming the key, the value and what is allowed. `reject_unknown` is
the single unknown-key check of the project; `check_value` checks one value against a type
annotation and constraints (used for keys with no dataclass, e.g. lightning.Trainer's arguments).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from core.errors import UserError

CONSTRAINTS = ("ge", "gt", "le", "lt", "choices", "regex", "length")


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Optional[Callable[[], Any]] = None,
            ge=None, gt=None, le=None, lt=None, choices: Union[Iterable, Callable[[], Iterable], None] = None,
            regex: bool = False, length: Optional[int] = None) -> Any:
    """A dataclass field with a one-line `doc` and its allowed values (None: unconstrained).

    ge/gt/le/lt bound a number (each element of a list of numbers); `choices` is a collection or a
    function returning one (for choices known only at run time); `regex` says the string must
    compile as a regular expression; `length` fixes a list's length. None is always allowed for
    an Optional field."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "regex": regex, "length": length}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def reject_unknown(prefix: str, keys: Iterable[str], known: Iterable[str], what: str = "") -> None:
    """The one unknown-key check: `prefix.key` for the first key not in `known`."""
    known = set(known)
    for key in keys:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise UserError(f"unknown config key '{where}'{f' ({what})' if what else ''}; "
                            f"known: {', '.join(sorted(known))}")


# -- types ------------------------------------------------------------------------------------------
def describe_type(ann) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is Any:
        return "anything"
    if ann is type(None):
        return "null"
    if origin is Union:
        return " or ".join(dict.fromkeys(describe_type(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, Iterable, tuple):
        return f"a list of {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or ann is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(ann, getattr(
        ann, "__name__", str(ann)))


def matches_type(value, ann) -> bool:
    """Whether a plain (YAML-born) value fits `ann`; classes YAML cannot produce never match."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is Any:
        return True
    if ann is type(None):
        return value is None
    if origin is Union:
        return any(matches_type(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (list, Iterable, tuple):
        return isinstance(value, list) and (not args or all(matches_type(v, args[0]) for v in value))
    if origin is dict or ann is dict:
        return isinstance(value, dict)
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    return False


# -- constraints ------------------------------------------------------------------------------------
def _bounds(meta: dict) -> str:
    parts = [f"{op} {meta[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if meta.get(k) is not None]
    return " and ".join(parts)


def _choices(meta: dict) -> Optional[list]:
    choices = meta.get("choices")
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def allowed(meta: dict, ann=None) -> str:
    """What a field accepts, in words (used in messages and in --help)."""
    choices = _choices(meta)
    if choices is not None:
        return "one of " + ", ".join(map(str, choices))
    text = describe_type(ann) if ann is not None else "a value"
    if meta.get("length") is not None:
        text += f" of length {meta['length']}"
    if _bounds(meta):
        text += (", each " if text.startswith("a list") else " ") + _bounds(meta)
    if meta.get("regex"):
        text += " (a valid regular expression)"
    return text


def _bad(key: str, value, why: str) -> UserError:
    return UserError(f"invalid value for config key '{key}': {value!r} ({why})")


def check_value(key: str, value, meta: dict, ann=None) -> None:
    """Raise a one-line UserError unless `value` fits `ann` and the constraints in `meta`."""
    if ann is not None and not matches_type(value, ann):
        raise _bad(key, value, f"allowed: {describe_type(ann)}")
    if value is None:
        return
    choices = _choices(meta)
    if choices is not None and value not in choices:
        raise UserError(f"unknown {key} {value!r}; choose one of: {', '.join(map(str, choices))}")
    if meta.get("length") is not None and len(value) != meta["length"]:
        raise _bad(key, value, f"allowed: {meta['length']} values")
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for number in numbers:
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        for name, ok in (("ge", lambda b: number >= b), ("gt", lambda b: number > b),
                         ("le", lambda b: number <= b), ("lt", lambda b: number < b)):
            if meta.get(name) is not None and not ok(meta[name]):
                raise _bad(key, value, f"allowed: {allowed(meta, ann)}")
    if meta.get("regex"):
        try:
            re.compile(value)
        except re.error as err:
            raise _bad(key, value, f"not a regular expression: {err}") from err


def check_settings(obj, prefix: str) -> None:
    """Check every declared constraint of a settings object, recursing into nested settings (and
    lists / mappings of them)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if any(f.metadata.get(c) is not None and f.metadata.get(c) is not False for c in CONSTRAINTS):
            check_value(key, value, dict(f.metadata), hints.get(f.name))
        _recurse(value, key)


def _recurse(value, key: str) -> None:
    if dataclasses.is_dataclass(value):
        check_settings(value, key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if dataclasses.is_dataclass(item):
                check_settings(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            if dataclasses.is_dataclass(item):
                check_settings(item, f"{key}.{name}")


def config_error(err: OmegaConfBaseException, prefix: str = "") -> UserError:
    """An OmegaConf merge / conversion error as one line naming the key, the value and the type."""
    key = str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")
    full = f"{prefix}.{key}" if prefix and key else (key or prefix or "?")
    if isinstance(err, ConfigKeyError) or "not in" in str(err).splitlines()[0]:
        owner = getattr(err, "object_type", None)
        known = [f.name for f in dataclasses.fields(owner)] if dataclasses.is_dataclass(owner) else []
        return UserError(f"unknown config key '{full}'" + (f"; known: {', '.join(sorted(known))}" if known else ""))
    value = getattr(err, "value", None)
    owner, name = getattr(err, "object_type", None), getattr(err, "key", None)
    ann = None
    if dataclasses.is_dataclass(owner) and isinstance(name, str):
        ann = typing.get_type_hints(owner).get(name)
    elif owner is list and isinstance(name, int):
        return _bad(full, value, str(err).splitlines()[0])
    why = f"allowed: {describe_type(ann)}" if ann is not None else str(err).splitlines()[0]
    return _bad(full, value, why)


def parse_section(values, cls: type, prefix: str):
    """`values` (a mapping or DictConfig) as a checked `cls` instance."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), values if values is not None else {})
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise config_error(err, prefix) from err
    check_settings(obj, prefix)
    return obj


def field_docs(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, doc) of every field of a settings class, nested ones flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        ann = hints.get(f.name)
        if isinstance(ann, type) and dataclasses.is_dataclass(ann):
            rows += field_docs(ann, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "???")
        rows.append((key, repr(default), allowed(dict(f.metadata), ann), f.metadata.get("doc", "")))
    return rows
