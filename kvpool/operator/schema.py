"""Annotated dataclasses → OpenAPI v3 structural schema, and dicts → typed objects.

The KVCachePool API is written once, as frozen dataclasses whose fields carry their
OpenAPI facts (description, default, enum, bounds, pattern) in ``field(...)`` metadata and
whose classes carry CEL rules in ``__cel__``. Two walks over that one definition give:

- :func:`openapi` — the structural schema embedded in the CRD (``kvpool crd``);
- :func:`load` — a typed, defaulted object from a resource's raw ``spec`` dict, which the
  operator uses so that a pool stored without the API server's defaulting (an emulator, a
  CRD applied without defaults) still gets the same defaults.

Supported field types: ``str``, ``int``, ``bool``, ``Literal[...]`` (a string enum),
``list[T]``, ``dict[str, T]``, ``T | None`` (optional), nested dataclasses, and the
markers :data:`Quantity` (int-or-string) and :data:`Embedded` (a Kubernetes object kept
as is, e.g. tolerations).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

_QUANTITY = "quantity"
_EMBEDDED = "embedded"
_INT64 = "int64"

Quantity = Annotated[int | str, _QUANTITY]
"""A Kubernetes resource quantity (``4``, ``500m``, ``16Gi``): int-or-string in the schema."""

Embedded = Annotated[dict[str, Any], _EMBEDDED]
"""A Kubernetes sub-object validated by the API server's own types, kept as is here."""

Int64 = Annotated[int, _INT64]
"""An integer that may pass 2^31 (byte counts): ``format: int64`` in the schema."""

_MISSING = dataclasses.MISSING
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One CEL validation rule of a type: ``x-kubernetes-validations`` in the CRD."""

    rule: str
    message: str
    field_path: str | None = None
    """Where the API server reports a violation (``.decode.replicas``); None: the type."""

    def openapi(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


def field(
    description: str,
    *,
    default: Any = _MISSING,
    minimum: int | None = None,
    maximum: int | None = None,
    pattern: str | None = None,
    max_length: int | None = None,
    max_items: int | None = None,
    max_properties: int | None = None,
    name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Any:
    """A dataclass field with its OpenAPI facts; ``name`` overrides the camelCase JSON name."""
    facts = {
        "description": description,
        "minimum": minimum,
        "maximum": maximum,
        "pattern": pattern,
        "maxLength": max_length,
        "maxItems": max_items,
        "maxProperties": max_properties,
    }
    openapi_facts = {k: v for k, v in facts.items() if v is not None} | (extra or {})
    metadata = {"openapi": openapi_facts, "name": name}
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        frozen = default
        return dataclasses.field(default_factory=lambda: _copy(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value  # dataclasses here are frozen: sharing them is safe


@functools.cache
def json_name(f: dataclasses.Field[Any]) -> str:
    """The field's JSON name: explicit, else the Python name in camelCase (cached: every
    dump of a spec asks for every field's)."""
    if f.metadata.get("name"):
        return str(f.metadata["name"])
    head, *rest = f.name.split("_")
    return head + "".join(part.title() for part in rest)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _marker(tp: Any) -> str | None:
    """``quantity`` / ``embedded`` / ``int64`` for the marker types above, else None."""
    if typing.get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if m in (_QUANTITY, _EMBEDDED, _INT64)), None)
    return None


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_schema(tp: Any) -> dict[str, Any]:
    tp, _ = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if _marker(tp) == _QUANTITY:
        return {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    if _marker(tp) == _EMBEDDED:
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if _marker(tp) == _INT64:
        return {"type": "integer", "format": "int64"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer", "format": "int32"}
    if tp is str:
        return {"type": "string"}
    if origin is Literal:
        return {"type": "string", "enum": list(typing.get_args(tp))}
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": _type_schema(item)}
    if origin is dict:
        key, value = typing.get_args(tp)
        if key is not str:
            raise TypeError(f"map keys must be str, not {key!r}")
        return {"type": "object", "additionalProperties": _type_schema(value)}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return openapi(tp)
    raise TypeError(f"no OpenAPI mapping for {tp!r}")


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # ``{}`` lets the API server fill the nested defaults itself.
        return {} if value == type(value)() else dump(value)
    return _copy(value)


def openapi(cls: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a dataclass (recursively), with defaults and rules."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        facts = f.metadata["openapi"]
        schema = {"description": facts["description"]}
        schema.update((k, v) for k, v in _type_schema(tp).items() if k != "description")
        schema.update(facts)
        if f.default is not _MISSING and f.default is not None:
            schema["default"] = _to_json(f.default)
        elif f.default_factory is not _MISSING:
            schema["default"] = _to_json(f.default_factory())
        elif f.default is _MISSING and not _unwrap_optional(tp)[1]:
            required.append(json_name(f))
        properties[json_name(f)] = schema
    out: dict[str, Any] = {"type": "object"}
    if cls.__doc__:
        out["description"] = " ".join(cls.__doc__.split())
    out["properties"] = properties
    if required:
        out["required"] = required
    rules: tuple[Rule, ...] = getattr(cls, "__cel__", ())
    if rules:
        out["x-kubernetes-validations"] = [r.openapi() for r in rules]
    return out


class SpecError(ValueError):
    """A raw spec that does not fit the schema; ``path`` says where (``spec.decode.replicas``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def _load_value(tp: Any, raw: Any, path: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if raw is None:
        if optional:
            return None
        raise SpecError(path, "must not be null")
    if _marker(tp) == _QUANTITY:
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise SpecError(path, f"must be an integer or a quantity string, not {raw!r}")
        return raw
    if _marker(tp) == _EMBEDDED:
        if not isinstance(raw, Mapping):
            raise SpecError(path, "must be an object")
        return _copy(dict(raw))
    if _marker(tp) == _INT64:
        tp = int
    if tp is bool or tp is int or tp is str:
        if type(raw) is not tp:
            raise SpecError(path, f"must be of type {tp.__name__}, not {type(raw).__name__}")
        return raw
    if origin is Literal:
        if raw not in typing.get_args(tp):
            raise SpecError(path, f"must be one of {list(typing.get_args(tp))}, not {raw!r}")
        return raw
    if origin is list:
        if not isinstance(raw, list):
            raise SpecError(path, "must be a list")
        (item,) = typing.get_args(tp)
        return [_load_value(item, v, f"{path}[{i}]") for i, v in enumerate(raw)]
    if origin is dict:
        if not isinstance(raw, Mapping):
            raise SpecError(path, "must be an object")
        _, value = typing.get_args(tp)
        return {str(k): _load_value(value, v, f"{path}.{k}") for k, v in raw.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return load(tp, raw, path)
    raise TypeError(f"no loader for {tp!r}")


def _check_bounds(facts: Mapping[str, Any], value: Any, path: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        if "minimum" in facts and value < facts["minimum"]:
            raise SpecError(path, f"must be >= {facts['minimum']}, not {value}")
        if "maximum" in facts and value > facts["maximum"]:
            raise SpecError(path, f"must be <= {facts['maximum']}, not {value}")
    if isinstance(value, str):
        if "pattern" in facts and not re.search(facts["pattern"], value):
            raise SpecError(path, f"must match {facts['pattern']!r}, not {value!r}")
        if "maxLength" in facts and len(value) > facts["maxLength"]:
            raise SpecError(path, f"must be at most {facts['maxLength']} characters")
    if isinstance(value, list) and "maxItems" in facts and len(value) > facts["maxItems"]:
        raise SpecError(path, f"must have at most {facts['maxItems']} items")
    if isinstance(value, dict) and "maxProperties" in facts and len(value) > facts["maxProperties"]:
        raise SpecError(path, f"must have at most {facts['maxProperties']} entries")


def load(cls: type[T], raw: Any, path: str = "spec") -> T:
    """Build ``cls`` from a JSON-like dict: defaults filled, types, enums and bounds checked.

    Unknown keys are an error (the API server prunes them; here they mean a typo).
    CEL rules are not evaluated here: see :mod:`kvpool.operator.validation`.
    """
    if not isinstance(raw, Mapping):
        raise SpecError(path, "must be an object")
    fields = {json_name(f): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SpecError(path, f"unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{path}.{name}"
        if name in raw:
            value = _load_value(_hints(cls)[f.name], raw[name], sub)  # type: ignore[arg-type]
            _check_bounds(f.metadata["openapi"], value, sub)
            kwargs[f.name] = value
        elif f.default is _MISSING and f.default_factory is _MISSING:
            if not _unwrap_optional(_hints(cls)[f.name])[1]:  # type: ignore[arg-type]
                raise SpecError(sub, "is required")
            kwargs[f.name] = None
    return cls(**kwargs)


def dump(obj: Any) -> Any:
    """The JSON form of a loaded object (camelCase keys, None fields left out)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            json_name(f): dump(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if getattr(obj, f.name) is not None
        }
    if isinstance(obj, list):
        return [dump(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    return obj
