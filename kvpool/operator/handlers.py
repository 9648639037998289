"""kopf handlers: reconcile pools, put back drifted children, write status, clean up.

- ``pools`` index: the latest :class:`~kvpool.operator.plan.Plan` of every pool.
- ``<kind>_index`` (configmaps, services, deployments, poddisruptionbudgets): the
  operator's children as they are, keyed by (namespace, pool).
- create/update/resume of a pool → :func:`reconcile`: apply every child with server-side
  apply (skipped when the inputs hash and the children already match), then status.
- any event of a child → :func:`on_child_event`: a deleted or hand-edited child is
  applied again; a Deployment's change refreshes the pool's status.
- delete of a pool → :func:`cleanup`: its children are deleted, then kopf releases it.

A spec the operator cannot honour (schema or CEL violations, a child the API server
rejects) becomes ``Degraded=True`` with the reason and a Warning Event, never an
exception loop. Handlers are sync: kopf runs them in its thread pool, where the blocking
:class:`~kvpool.operator.kube.Client` is at home.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import kopf

from kvpool.operator import api, children, crd, kube, plan, status
from kvpool.operator.settings import OperatorSettings

MANAGED = {"app.kubernetes.io/managed-by": children.MANAGED_BY}
CHILD_RESOURCES = (
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
    ("apps", "v1", "deployments"),
    ("policy", "v1", "poddisruptionbudgets"),
)
FINALIZER = f"{api.GROUP}/finalizer"


@dataclasses.dataclass
class Memo:
    """What every handler shares (kopf's ``memo``)."""

    settings: OperatorSettings
    client: kube.Client


def configure(settings: kopf.OperatorSettings, op: OperatorSettings) -> None:
    """kopf settings: own finalizer and annotations, no kopf fields in status."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # handler logs; our own events always post
    settings.execution.max_workers = 8
    settings.networking.request_timeout = op.apply.request_timeout_s
    settings.watching.server_timeout = 300
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]


# --- indexes ----------------------------------------------------------------------------

@kopf.index(api.GROUP, api.VERSION, api.PLURAL)
def pools(body: kopf.Body, memo: Memo, **_: Any) -> dict[tuple[str, str], plan.Plan]:
    p = plan.make(body, memo.settings.render)
    return {(p.pool.namespace, p.pool.name): p}


def _index_child(body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]] | None:
    pool = body.metadata.labels.get(children.POOL_LABEL)
    if not pool:
        return None
    return {(body.metadata.namespace, pool): dict(body)}


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.index(_group, _version, _plural, labels=MANAGED, id=f"{_plural}_index")(_index_child)


def _live_children(namespace: str, pool: str, indexes: Mapping[str, Any]) -> list[dict]:
    out: list[dict] = []
    for _, _, plural in CHILD_RESOURCES:
        index = indexes[f"{plural}_index"]
        out.extend(index.get((namespace, pool), ()))
    return out


def _latest_plan(index: kopf.Index, namespace: str, name: str) -> plan.Plan | None:
    for p in index.get((namespace, name), ()):
        return p
    return None


# --- status -----------------------------------------------------------------------------

def _workloads(p: plan.Plan, live: Iterable[Mapping[str, Any]]) -> dict[str, status.Workload]:
    out = {}
    for obj in live:
        if obj.get("kind") != "Deployment" or not _owned_by(obj, p.pool.uid):
            continue
        component = obj["metadata"].get("labels", {}).get(children.ROLE_LABEL)
        if component:
            out[component] = status.Workload.from_deployment(obj)
    return out


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences", [])
    return any(ref.get("uid") == uid for ref in refs)


def _write_status(memo: Memo, p: plan.Plan, live: list[dict],
                  problem: tuple[str, str] | None = None, missing: Iterable[str] = ()) -> None:
    new = status.compute(
        pool=p.pool,
        generation=p.generation,
        spec=p.spec if (problem or p.problem) is None else None,
        digest=p.digest,
        endpoint=p.endpoint,
        workloads=_workloads(p, live),
        missing=list(missing),
        problem=problem or p.problem,
        previous=p.status.get("conditions", []),
    )
    if status.same(new, p.status):
        return
    body = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": p.pool.name, "namespace": p.pool.namespace},
        "status": new,
    }
    memo.client.apply(body, memo.settings.apply.status_field_manager, subresource="status")


def _missing(p: plan.Plan, live: Iterable[Mapping[str, Any]]) -> list[plan.ChildKey]:
    present = {children.key(obj): obj for obj in live if _owned_by(obj, p.pool.uid)}
    return [
        key for key, desired in p.children.items()
        if key not in present or not plan.contains(present[key], desired)
    ]


# --- pool lifecycle ---------------------------------------------------------------------

def _already_reported(p: plan.Plan, reason: str, message: str) -> bool:
    for cond in p.status.get("conditions", []):
        if (cond.get("type") == "Degraded" and cond.get("status") == "True"
                and cond.get("reason") == reason and cond.get("message") == message
                and cond.get("observedGeneration") == p.generation):
            return True
    return False


def _report_problem(memo: Memo, p: plan.Plan, live: list[dict], reason: str,
                    message: str, logger: logging.Logger | kopf.Logger) -> None:
    if not _already_reported(p, reason, message):
        kopf.warn(p.body_ref, reason=reason, message=message)
        logger.warning(f"{reason}: {message}")
    _write_status(memo, p, live, problem=(reason, message))


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL)
def reconcile(body: kopf.Body, memo: Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    """Make the children match the pool, then report how they are."""
    p = plan.make(body, memo.settings.render)
    live = _live_children(p.pool.namespace, p.pool.name, kwargs)
    if p.problem is not None:
        _report_problem(memo, p, live, *p.problem, logger)
        return
    todo = _missing(p, live)
    if todo or p.status.get("inputsHash") != p.digest:
        to_apply = p.children if p.status.get("inputsHash") != p.digest else {
            k: p.children[k] for k in todo}
        try:
            for obj in to_apply.values():
                memo.client.apply(obj, memo.settings.apply.field_manager)
        except kube.ApiError as exc:
            if exc.status >= 500 or exc.status == 429:
                raise kopf.TemporaryError(str(exc), delay=memo.settings.retry_delay_s) from exc
            message = f"{obj['kind']} {obj['metadata']['name']} rejected: {exc.message}"
            _report_problem(memo, p, live, status.APPLY_FAILED, message, logger)
            # Not honourable as is; retried slowly in case the cause is outside the spec
            # (RBAC, quota, a foreign object holding the name).
            raise kopf.TemporaryError(message, delay=60) from exc
        logger.info(f"applied {len(to_apply)} children (inputs {p.digest})")
    _write_status(memo, p, _live_children(p.pool.namespace, p.pool.name, kwargs))


@kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL)
def cleanup(body: kopf.Body, memo: Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    """Delete the pool's children (owner references would too, but later and unordered)."""
    meta = body["metadata"]
    live = _live_children(meta["namespace"], meta["name"], kwargs)
    deleted = 0
    for obj in live:
        if _owned_by(obj, meta["uid"]):
            api_version, kind, name = children.key(obj)
            deleted += memo.client.delete(api_version, kind, meta["namespace"], name)
    logger.info(f"deleted {deleted} children")


# --- children ---------------------------------------------------------------------------

def on_child_event(event: kopf.RawEvent, body: kopf.Body, memo: Memo, logger: kopf.Logger,
                   pools: kopf.Index, **kwargs: Any) -> None:
    """Put back a deleted or edited child; refresh the pool's status on Deployment news."""
    pool_name = body.metadata.labels.get(children.POOL_LABEL)
    namespace = body.metadata.namespace
    p = _latest_plan(pools, namespace, pool_name) if pool_name and namespace else None
    if p is None or p.deleting or p.problem is not None or not _owned_by(body, p.pool.uid):
        return
    key = children.key(body)
    desired = p.children.get(key)
    deleted = event.get("type") == "DELETED"
    if desired is not None and (deleted or not plan.contains(body, desired)):
        what = "deleted" if deleted else "changed by someone else"
        memo.client.apply(desired, memo.settings.apply.field_manager)
        kopf.info(p.body_ref, reason="ChildRestored", message=f"{key[1]} {key[2]} was {what}")
        logger.info(f"restored {key[1]} {key[2]}: it was {what}")
    if key[1] == "Deployment":
        live = _live_children(namespace, pool_name, kwargs)
        _write_status(memo, p, live)


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, labels=MANAGED, id=f"{_plural}_drift")(
        on_child_event)


# --- operator lifecycle -----------------------------------------------------------------

def ensure_peering(client: kube.Client, namespaces: Iterable[str] | None) -> None:
    """Create the peering object(s) the replicas meet in, when absent."""
    objects = ([crd.peering_object()] if namespaces is None
               else [crd.peering_object(ns) for ns in namespaces])
    for obj in objects:
        meta = obj["metadata"]
        if client.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]):
            continue
        try:
            client.create(obj)
        except kube.ApiError as exc:
            if exc.status != 409:  # another replica was faster
                raise


@kopf.on.probe(id="pools")
def pools_known(pools: kopf.Index, **_: Any) -> int:
    """Liveness detail: how many pools this replica knows."""
    return len(pools)
