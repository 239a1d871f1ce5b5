"""Parsed YAML into typed config objects, with pydantic; every error one line naming the key.

A section is a frozen dataclass (:mod:`pipeline.config_schema`) with ``STRICT`` as its
pydantic config and :func:`check_section` as its ``__post_init__``. :func:`bind` validates
the value as JSON data in pydantic's strict mode: a list where a tuple is declared and an
integer where a float is are taken, nothing else is converted ('1' is not 1, 'yes' is not
true), and no unknown key passes. Pydantic's first error becomes a ``ConfigError`` such as
``train.lr: expected a number, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from functools import cache
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from dpfah.settings import check_fields, finite

from .errors import ConfigError

__all__ = ["STRICT", "Free", "Invalid", "bind", "check_section", "distinct", "free_value", "matches", "section"]

#: How pydantic reads a section: no unknown key, no implicit conversion, no inf or NaN in a float.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Invalid(Exception):
    """Raised by a section's ``validate()``: ``key`` is relative to the section."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.key = key
        self.message = message


def check_section(obj: Any) -> None:
    """A section's ``__post_init__``: every field's check, then ``validate()``; a ``ValueError``
    whose message starts with the key relative to the section (``key: what is wrong``)."""
    check_fields(obj)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except Invalid as e:
            raise ValueError(f"{e.key}: {e.message}") from None


@typing.dataclass_transform(frozen_default=True)
def section(cls: type) -> type:
    """A section of the parameters: a frozen dataclass that pydantic reads with ``STRICT`` and
    that runs :func:`check_section` when made (unless it has a ``__post_init__`` of its own)."""
    cls.__pydantic_config__ = STRICT
    if "__post_init__" not in cls.__dict__:
        cls.__post_init__ = check_section
    return dataclasses.dataclass(frozen=True)(cls)


def free_value(value: Any) -> Any:
    """A method's hyper-parameter value, whose type the method declares (checked on loading):
    here only a value, not a mapping, and finite; a list becomes a tuple."""
    if isinstance(value, dict):
        raise PydanticCustomError("config_value", "expected a value, got a mapping {value}", {"value": repr(value)})
    problem = finite(value)
    if problem:
        raise PydanticCustomError("config_value", problem)
    return tuple(value) if isinstance(value, list) else value


#: A value of any type, checked against a method's declaration when the parameters load.
Free = Annotated[Any, AfterValidator(free_value)]


def matches(pattern: str, what: str) -> Callable[[Any], str | None]:
    """A check: the string matches ``pattern`` (None passes)."""
    rx = re.compile(pattern)
    return lambda v: None if v is None or rx.match(v) else f"{v!r} is not {what}"


def distinct(what: str, low: int) -> Callable[[Any], str | None]:
    """A check of a list: one or more distinct values >= ``low``."""
    return lambda v: None if v and len(set(v)) == len(v) and min(v) >= low else f"must list distinct {what} >= {low}"


@cache
def _adapter(tp: Any) -> TypeAdapter:
    holder = dataclasses.make_dataclass("Value", [("value", tp)], namespace={"__pydantic_config__": STRICT})
    return TypeAdapter(holder)


def bind(tp: Any, value: Any, where: str = "") -> Any:
    """``value`` (parsed YAML) as a ``tp`` (a section, or any type of a field); a
    ``ConfigError`` naming the first wrong key below ``where``."""
    try:
        text = json.dumps({"value": value}, default=str)
    except ValueError as e:  # a YAML anchor that contains itself
        raise ConfigError(f"{where or 'params'}: not plain data ({e})") from None
    try:
        return _adapter(tp).validate_json(text, strict=True).value
    except ValidationError as e:
        message = _message(tp, e.errors()[0], where)
        raise ConfigError(message.removeprefix(": ")) from None  # the value itself: no key to name


# ----------------------------------------------------------------------------- error messages

_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "tuple": "a list",
    "list": "a list",
    "dict": "a mapping",
    "dataclass": "a mapping",
}


def _choices(options: Sequence[Any]) -> str:
    shown = [str(o) for o in options] or ["none"]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _members(tp: Any) -> list[Any]:
    """The types a value of ``tp`` may be, None aside (Annotated stripped)."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _kinds(members: Sequence[Any]) -> dict[str, Any]:
    return {typing.get_args(typing.get_type_hints(m)["kind"])[0]: m for m in members}


def _locate(tp: Any, loc: Sequence[Any], where: str) -> tuple[str, Any, dict[str, Any], Any]:
    """(dotted key, the type there, its field's metadata, the dataclass holding it) of ``loc``."""
    key, meta, owner = where, {}, None
    for item in loc:
        members = _members(tp)
        if len(members) > 1 and all(dataclasses.is_dataclass(m) for m in members):
            tp = _kinds(members).get(item)  # the tag of a union: no key of its own
            continue
        tp = members[0] if members else tp
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            owner, hints = tp, typing.get_type_hints(tp)
            fields = {f.name: f for f in dataclasses.fields(tp)}
            meta = dict(fields[item].metadata) if item in fields else {}
            tp = hints.get(item)
        elif origin is dict:
            owner, meta, tp = None, {}, typing.get_args(tp)[1]
        elif origin is tuple:
            key, tp = f"{key}[{item}]", typing.get_args(tp)[0]
            continue
        key = f"{key}.{item}" if key else str(item)
    return key, tp, meta, owner


def _message(tp: Any, error: dict[str, Any], where: str) -> str:
    kind, value = error["type"], error.get("input")
    key, at, meta, owner = _locate(tp, error["loc"][1:], where)
    base = kind.split("_")[0]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        known = ", ".join(f.name for f in dataclasses.fields(owner)) if owner else ""
        return f"{key}: unknown {getattr(owner, 'KEYS_ARE', 'key')} (known: {known})"
    if kind in ("missing", "missing_argument"):
        return f"{key}: missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = _choices(list(_kinds(_members(at))))
        if kind == "union_tag_not_found" or (isinstance(value, dict) and value.get("kind") is None):
            return f"{key}.kind: missing (choose {tags})"
        return f"{key}.kind: unknown kind {error['ctx']['tag']!r} (choose {tags})"
    if kind == "literal_error":
        options = typing.get_args(_members(at)[0]) if at is not None else ()
        return f"{key}: unknown {meta.get('noun', 'value')} {value!r} (choose {_choices(options)})"
    if kind == "finite_number":
        return f"{key}: must be a finite number, got {value!r}"
    if kind == "value_error":  # a section's check: "<key in the section>: what is wrong"
        return f"{key + '.' if key else ''}{error['ctx']['error']}"
    if kind == "config_value":
        return f"{key}: {error['msg']}"
    if base in _EXPECTED and kind.endswith(("_type", "_parsing", "_from_float")):
        if value is None:
            return f"{key}: missing value (expected {_EXPECTED[base]})"
        return f"{key}: expected {_EXPECTED[base]}, got {value!r}"
    return f"{key or 'params'}: {error['msg']}"
