"""Typed results: dataclasses whose dict form is the metrics.json and cache schema.

A result class subclasses `Record` and declares its fields with type hints;
`to_dict()` gives the JSON-ready dict and `from_dict()` reads one back, so the
fields *are* the schema. Field names equal the JSON keys; keys that are not
identifiers ("gradcam++", "1/255") live in `dict[str, X]` fields.

Supported field types: the JSON scalars (bool, int, float, str, None), Record
subclasses, list[X], tuple[X, ...], dict[str, X], X | None, and Any (kept
as is). `from_dict` checks types as it goes and raises `ResultFormatError`
naming the first path that does not fit; a cache reader treats that as a miss.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from .errors import ResultFormatError

R = TypeVar("R", bound="Record")

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


class Record:
    """Mixin for result dataclasses: dict round trip driven by the type hints."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _dump(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str | None = None) -> R:
        return _load(cls, data, where or cls.__name__)


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _load(tp: Any, data: Any, where: str) -> Any:
    if tp is Any:
        return data
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        alternatives = typing.get_args(tp)
        if data is None and type(None) in alternatives:
            return None
        last = None
        for alt in alternatives:
            if alt is type(None):
                continue
            try:
                return _load(alt, data, where)
            except ResultFormatError as exc:
                last = exc
        raise last or ResultFormatError(f"{where} is {_kind(data)}, expected one of {tp}")
    if origin in (list, tuple):
        if not isinstance(data, (list, tuple)):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected a list")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_load(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(data, dict):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected an object")
        value_type = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: _load(value_type, v, f"{where}.{k}") for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, Record):
        if not isinstance(data, dict):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected an object")
        values = {}
        for f in dataclasses.fields(tp):  # type: ignore[arg-type]
            if f.name in data:
                values[f.name] = _load(_hints(tp)[f.name], data[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ResultFormatError(f"{where}.{f.name} is missing")
        return tp(**values)
    if tp is type(None):
        if data is not None:
            raise ResultFormatError(f"{where} is {_kind(data)}, expected null")
        return None
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected a number")
        return data  # an int stays an int, so a round trip gives back the same JSON
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected a whole number")
        return data
    if tp in (str, bool):
        if not isinstance(data, tp):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected {tp.__name__}")
        return data
    raise TypeError(f"{where}: unsupported field type {tp!r} in a Record")
