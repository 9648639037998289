"""From a pool's raw body to the operator's plan for it: pure, cached in kopf's index.

A :class:`Plan` holds the typed spec, the CEL/schema problem that stops rendering (if
any), and the rendered children keyed by (apiVersion, kind, name). kopf keeps the latest
plan of every pool in an index, so a child's watch event finds what that child should
look like without reading the pool or rendering again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

from kvpool.operator import api, children, schema, validation
from kvpool.operator.settings import RenderSettings
from kvpool.operator.status import INVALID_SPEC

ChildKey = tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class Plan:
    pool: children.PoolRef
    generation: int
    deleting: bool
    spec: api.KVCachePoolSpec | None
    problem: tuple[str, str] | None
    """(reason, message) when the spec cannot be honoured; then nothing is rendered."""
    digest: str | None
    children: Mapping[ChildKey, dict[str, Any]]
    endpoint: str | None
    status: Mapping[str, Any]
    """The pool's status as last seen (to keep transition times and skip no-op writes)."""

    @property
    def body_ref(self) -> dict[str, Any]:
        """Enough of the pool's body for kopf to post an Event about it."""
        return {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": self.pool.name, "namespace": self.pool.namespace,
                         "uid": self.pool.uid},
        }


def make(body: Mapping[str, Any], settings: RenderSettings) -> Plan:
    """The plan for a pool body as the API server returns it.

    The expensive part (schema, CEL, rendering) depends only on the pool's identity and
    spec, and is cached: kopf calls this on every event of a pool, status writes included.
    The children it returns are shared between calls and must not be modified.
    """
    meta = body.get("metadata", {})
    pool = children.PoolRef(meta.get("name", ""), meta.get("namespace", ""), meta.get("uid", ""))
    spec_json = json.dumps(body.get("spec"), sort_keys=True)
    return Plan(
        pool=pool,
        generation=int(meta.get("generation", 0)),
        deleting=bool(meta.get("deletionTimestamp")),
        status=dict(body.get("status") or {}),
        **_rendered(pool, spec_json, settings),
    )


@functools.lru_cache(maxsize=4096)
def _rendered(pool: children.PoolRef, spec_json: str, settings: RenderSettings) -> dict[str, Any]:
    empty: dict[str, Any] = {"digest": None, "children": {}, "endpoint": None}
    try:
        spec = api.load_spec(json.loads(spec_json))
    except schema.SpecError as exc:
        return {"spec": None, "problem": (INVALID_SPEC, str(exc)), **empty}
    meta = {"name": pool.name, "namespace": pool.namespace}
    found = validation.violations({"metadata": meta, "spec": schema.dump(spec)})
    if found:
        message = "; ".join(str(v) for v in found)
        return {"spec": spec, "problem": (INVALID_SPEC, message), **empty}
    objects = children.render(pool, spec, settings)
    return {
        "spec": spec,
        "problem": None,
        "digest": objects[0]["metadata"]["annotations"][children.HASH_ANNOTATION],
        "children": {children.key(obj): obj for obj in objects},
        "endpoint": children.router_endpoint(pool, spec, settings),
    }


def contains(live: Any, desired: Any) -> bool:
    """Whether ``live`` holds everything ``desired`` sets (the API server may add more).

    Scalars compare as strings when their types differ: the API server answers ``"1"``
    for a quantity applied as ``1``.
    """
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and contains(live[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (isinstance(live, list) and len(live) == len(desired)
                and all(contains(a, b) for a, b in zip(live, desired, strict=True)))
    if type(live) is not type(desired) and not isinstance(desired, bool):
        return str(live) == str(desired)
    return bool(live == desired)
