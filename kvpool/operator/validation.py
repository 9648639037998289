"""The CRD's CEL rules, evaluated here too (cel-python), so every check has one definition.

The API server runs the ``x-kubernetes-validations`` of the CRD on every write. The
operator evaluates the same rules, taken from the generated CRD, on each pool before it
renders anything: a pool stored past them (a CRD installed without them, an API server
too old for CEL, an emulator) becomes a ``Degraded`` condition with the rule's message,
not a broken Deployment. Tests use the same function on good and bad pools.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator
from typing import Any

import celpy
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from kvpool.operator import crd


@dataclasses.dataclass(frozen=True)
class Violation:
    """A rule that does not hold: where (``spec.transfer``) and the rule's message."""

    path: str
    message: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@functools.cache
def _environment() -> celpy.Environment:
    return celpy.Environment()


@functools.cache
def _program(rule: str) -> celpy.Runner:
    env = _environment()
    return env.program(env.compile(rule))


@functools.cache
def _root_schema() -> dict[str, Any]:
    root: dict[str, Any] = crd.kvcachepool_crd()["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]
    return root


def _nodes(schema: dict[str, Any], value: Any,
           path: str) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """Every (path, schema, value) pair of ``value`` under ``schema``, depth first."""
    yield path, schema, value
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                yield from _nodes(sub, value[name], f"{path}.{name}" if path else name)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                yield from _nodes(extra, item, f"{path}[{name!r}]")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _nodes(schema["items"], item, f"{path}[{i}]")


@functools.lru_cache(maxsize=4096)
def _evaluate(rule: str, value_json: str) -> tuple[bool, str]:
    """(passes, CEL error) of ``rule`` on a value given as JSON. Pure, so cached: pools
    whose specs share parts skip the interpreter for those parts."""
    try:
        return bool(_program(rule).evaluate({"self": json_to_cel(json.loads(value_json))})), ""
    except CELEvalError as exc:
        return False, str(exc)


def violations(pool: dict[str, Any]) -> list[Violation]:
    """The CEL rules of the CRD that ``pool`` (metadata + defaulted spec) breaks."""
    found = []
    for path, schema, value in _nodes(_root_schema(), pool, ""):
        for rule in schema.get("x-kubernetes-validations", ()):
            ok, error = _evaluate(rule["rule"], json.dumps(value, sort_keys=True))
            if error:  # a missing field in a rule: report, not crash
                found.append(Violation(path or "<root>", f"{rule['message']} ({error})",
                                       rule["rule"]))
                continue
            if not ok:
                where = path + rule.get("fieldPath", "") if path else rule.get("fieldPath", "")
                found.append(Violation(where.lstrip(".") or "<root>", rule["message"],
                                       rule["rule"]))
    return found


def warm_up() -> None:
    """Build the CEL parser and compile every rule now (about a second), not on the first pool."""
    for rule in all_rules():
        _program(rule)


def all_rules() -> list[str]:
    """Every CEL rule the CRD carries (for tests that prove each one can fail)."""
    return [
        rule["rule"]
        for _, schema, _ in _schema_nodes(_root_schema())
        for rule in schema.get("x-kubernetes-validations", ())
    ]


def _schema_nodes(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], None]]:
    yield "", schema, None
    for sub in schema.get("properties", {}).values():
        yield from _schema_nodes(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _schema_nodes(schema[key])
