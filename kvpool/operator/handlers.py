"""kopf handlers: reconcile pools, put back drifted children, write status, clean up.

- ``pools`` index: the latest :class:`~kvpool.operator.plan.Plan` of every pool.
- ``<kind>_index`` (configmaps, services, deployments, poddisruptionbudgets): the
  operator's children as they are, keyed by (namespace, pool).
- create/update/resume of a pool → :func:`reconcile`: create the pool's TLS Secret when
  it asks for mTLS and names none (once: an existing one is kept), apply every child with
  server-side apply (skipped when the inputs hash and the children already match), then
  status.
- any event of a child → :func:`on_child_event`: a deleted or hand-edited child is
  applied again; a Deployment's change refreshes the pool's status.
- delete of a pool → :func:`cleanup`: its children are deleted, then kopf releases it.
- every ``transfer_health_interval_s`` → :func:`transfer_health` (a timer registered by
  :mod:`kvpool.operator.main`): the sidecars' ``/transfer/health``, read with short
  timeouts beside the reconcile handlers, becomes the ``TransferHealthy`` condition.

A spec the operator cannot honour (schema or CEL violations, a child the API server
rejects) becomes ``Degraded=True`` with the reason and a Warning Event, never an
exception loop. Handlers that write are sync (kopf runs them in its thread pool, where the blocking
:class:`~kvpool.operator.kube.Client` is at home); indexes and the per-child-event check
are async, so that the thousands of events that change nothing cost no thread hop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import kopf

from kvpool.operator import api, children, crd, kube, plan, status, transfer
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
    reconciled: dict[str, tuple[int, str | None]] = dataclasses.field(default_factory=dict)
    """By pool uid: the (generation, inputs hash) reconcile() last wrote status for, known
    here before the pool's own watch event brings that status to the ``pools`` index."""
    status_locks: dict[str, asyncio.Lock] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(asyncio.Lock))
    """By pool uid: one status write at a time from news (a Deployment's, the sidecars'
    health), so that two writes computed from different moments cannot land in the wrong
    order."""
    transfer_health: dict[str, transfer.TransferVerdict] = dataclasses.field(
        default_factory=dict)
    """By pool uid: the latest reading of the pool's sidecars' transfer health."""
    tls_secrets: set[str] = dataclasses.field(default_factory=set)
    """Uids of the pools whose generated TLS Secret is known to exist."""


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
    settings.process.ultimate_exiting_timeout = 25  # below the pod's 30 s grace period


# --- indexes ----------------------------------------------------------------------------

@kopf.index(api.GROUP, api.VERSION, api.PLURAL)
async def pools(body: kopf.Body, memo: Memo, **_: Any) -> dict[tuple[str, str], plan.Plan]:
    p = plan.make(body, memo.settings.render)
    return {(p.pool.namespace, p.pool.name): p}


async def _index_child(body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]] | None:
    pool = body.metadata.labels.get(children.POOL_LABEL)
    namespace = body.metadata.namespace
    if not pool or not namespace:
        return None
    return {(namespace, pool): dict(body)}


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.index(_group, _version, _plural, labels=MANAGED, id=f"{_plural}_index")(_index_child)


Child = dict[str, Any]
PoolIndex = kopf.Index[tuple[str, str], plan.Plan]


def _live_children(namespace: str, pool: str, indexes: Mapping[str, Any]) -> list[Child]:
    out: list[Child] = []
    for _, _, plural in CHILD_RESOURCES:
        index = indexes[f"{plural}_index"]
        out.extend(index.get((namespace, pool), ()))
    return out


def _latest_plan(index: PoolIndex, namespace: str, name: str) -> plan.Plan | None:
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


def _status_patch(memo: Memo, p: plan.Plan, live: list[Child],
                  problem: tuple[str, str] | None = None,
                  missing: Iterable[str] = ()) -> dict[str, Any] | None:
    """The pool's status to apply, or None when it would change nothing (cheap)."""
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
        transfer=(memo.transfer_health.get(p.pool.uid)
                  or transfer.TransferVerdict.from_status(p.status)),
    )
    if status.same(new, p.status):
        return None
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": p.pool.name, "namespace": p.pool.namespace},
        "status": new,
    }


def _apply_status(memo: Memo, body: dict[str, Any] | None) -> None:
    if body is not None:
        memo.client.apply(body, memo.settings.apply.status_field_manager, subresource="status")


def _write_status(memo: Memo, p: plan.Plan, live: list[Child],
                  problem: tuple[str, str] | None = None, missing: Iterable[str] = ()) -> None:
    _apply_status(memo, _status_patch(memo, p, live, problem, missing))


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


def _report_problem(memo: Memo, p: plan.Plan, live: list[Child], reason: str,
                    message: str, logger: logging.Logger | kopf.Logger) -> None:
    if not _already_reported(p, reason, message):
        kopf.warn(p.body_ref, reason=reason, message=message)  # type: ignore[arg-type]
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
    try:
        _ensure_tls_secret(memo, p, logger)
    except kube.ApiError as exc:
        _apply_failed(memo, p, live, exc, f"Secret {p.pool.name}-sidecar-tls", logger)
    todo = _missing(p, live)
    if todo or p.status.get("inputsHash") != p.digest:
        to_apply = p.children if p.status.get("inputsHash") != p.digest else {
            k: p.children[k] for k in todo}
        try:
            for obj in to_apply.values():
                memo.client.apply(obj, memo.settings.apply.field_manager)
        except kube.ApiError as exc:
            _apply_failed(memo, p, live, exc, f"{obj['kind']} {obj['metadata']['name']}",
                          logger)
        logger.info(f"applied {len(to_apply)} children (inputs {p.digest})")
    # Known as reconciled before the status goes out: Deployment news arriving meanwhile
    # then refreshes the status itself instead of being dropped.
    memo.reconciled[p.pool.uid] = (p.generation, p.digest)
    _write_status(memo, p, _live_children(p.pool.namespace, p.pool.name, kwargs))


def _apply_failed(memo: Memo, p: plan.Plan, live: list[Child], exc: kube.ApiError,
                  what: str, logger: kopf.Logger) -> NoReturn:
    """Retry soon on a server error; else report the rejection, then retry slowly."""
    if exc.status >= 500 or exc.status == 429:
        raise kopf.TemporaryError(str(exc), delay=memo.settings.retry_delay_s) from exc
    message = f"{what} rejected: {exc.message}"
    _report_problem(memo, p, live, status.APPLY_FAILED, message, logger)
    # Not honourable as is; retried slowly in case the cause is outside the spec
    # (RBAC, quota, a foreign object holding the name).
    raise kopf.TemporaryError(message, delay=60) from exc


def _ensure_tls_secret(memo: Memo, p: plan.Plan, logger: kopf.Logger) -> None:
    """Create the pool's generated TLS Secret when it is missing; never touch an existing
    one (its certificates stay valid for the pods that mounted them). The operator may
    create Secrets but not read them: an existing one answers 409."""
    if p.spec is None or not children.generates_tls_secret(p.spec) \
            or p.pool.uid in memo.tls_secrets:
        return
    from kvpool.sidecar import tls

    try:
        memo.client.create(children.tls_secret(p.pool, tls.generate_bundle().secret_data()))
        logger.info(f"generated Secret {p.pool.name}-sidecar-tls "
                    "(self-signed CA and sidecar certificate)")
    except kube.ApiError as exc:
        if exc.status != 409:
            raise
    memo.tls_secrets.add(p.pool.uid)


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
    memo.reconciled.pop(meta["uid"], None)
    memo.status_locks.pop(meta["uid"], None)
    memo.transfer_health.pop(meta["uid"], None)
    memo.tls_secrets.discard(meta["uid"])
    logger.info(f"deleted {deleted} children")


# --- children ---------------------------------------------------------------------------

async def on_child_event(event: kopf.RawEvent, body: kopf.Body, memo: Memo,
                         logger: kopf.Logger, pools: PoolIndex, **kwargs: Any) -> None:
    """Put back a deleted or edited child; refresh the pool's status on Deployment news.

    Async, so that the common case (nothing to do) costs no thread hop; the blocking
    writes go to a thread.
    """
    pool_name = body.metadata.labels.get(children.POOL_LABEL)
    namespace = body.metadata.namespace
    if not pool_name or not namespace:
        return
    p = _latest_plan(pools, namespace, pool_name)
    if p is None or p.deleting or p.problem is not None or not _owned_by(body, p.pool.uid):
        return
    key = children.key(body)
    desired = p.children.get(key)
    deleted = event.get("type") == "DELETED"
    if desired is not None and (deleted or not plan.contains(body, desired)):
        what = "deleted" if deleted else "changed by someone else"
        await asyncio.to_thread(memo.client.apply, desired, memo.settings.apply.field_manager)
        kopf.info(p.body_ref,  # type: ignore[arg-type]  # kopf posts from any body-like dict
                  reason="ChildRestored", message=f"{key[1]} {key[2]} was {what}")
        logger.info(f"restored {key[1]} {key[2]}: it was {what}")
    if key[1] == "Deployment":
        await _refresh_status(memo, p, kwargs)


def _reconciled(memo: Memo, p: plan.Plan) -> bool:
    return (memo.reconciled.get(p.pool.uid) == (p.generation, p.digest)
            or (p.status.get("observedGeneration") == p.generation
                and p.status.get("inputsHash") == p.digest))


async def _refresh_status(memo: Memo, p: plan.Plan, indexes: Mapping[str, Any]) -> None:
    """Write the pool's status anew from news outside reconcile() (a Deployment's counts,
    the sidecars' health), once reconcile() has written it for this generation."""
    # Status moves to a new generation only in reconcile(), once every child is applied;
    # until then, news would report the new inputs too early.
    if not _reconciled(memo, p):
        return
    async with memo.status_locks[p.pool.uid]:
        # Computed under the lock from the indexes as they are now: two writes of news
        # computed at different moments could otherwise land in the wrong order.
        new = _status_patch(memo, p, _live_children(p.pool.namespace, p.pool.name, indexes))
        if new is not None:  # most news changes nothing: no write
            await asyncio.to_thread(_apply_status, memo, new)


async def transfer_health(body: kopf.Body, memo: Memo, **kwargs: Any) -> None:
    """Read the pool's sidecars' transfer health into its status (a kopf timer)."""
    p = plan.make(body, memo.settings.render)
    if p.deleting or p.problem is not None:
        return
    ready = sum(int((p.status.get(role) or {}).get("ready", 0)) for role in api.ROLES)
    if not ready:  # nothing to ask: no API request, no connection
        verdict = transfer.TransferVerdict.unknown(transfer.NO_READY, "no worker pod is ready")
    else:
        selector = f"{children.POOL_LABEL}={p.pool.name}"
        verdict = await transfer.collect(
            lambda: memo.client.list("v1", "Pod", p.pool.namespace, selector), p.pool.name,
            memo.settings.transfer_health_timeout_s)
    memo.transfer_health[p.pool.uid] = verdict
    await _refresh_status(memo, p, kwargs)


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, labels=MANAGED, id=f"{_plural}_drift")(
        on_child_event)  # type: ignore[arg-type]  # kopf passes the indexes as kwargs


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
            if exc.status == 404:
                raise SystemExit(
                    f"kvpool operator: the {obj['kind']} CRD is missing: install crds/ "
                    "(kvpool crd --all | kubectl apply -f -) or run with --standalone"
                ) from exc
            if exc.status != 409:  # 409: another replica was faster
                raise


@kopf.on.probe(id="pools")  # type: ignore[arg-type]  # kopf passes the indexes as kwargs
async def pools_known(pools: PoolIndex, **_: Any) -> int:
    """Liveness detail: how many pools this replica knows."""
    return len(pools)
