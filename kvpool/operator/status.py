"""The pool's status, computed from its children: a pure function, like the rendering.

Conditions follow ``metav1.Condition``: ``Ready`` (every role has its desired pods
ready), ``Progressing`` (children being created or rolled out), ``Degraded`` (the
operator cannot make the children match the spec: an invalid spec or a rejected child),
``TransferHealthy`` (what the sidecars say of their KV transfers, :mod:`.transfer`),
each with a CamelCase reason and a message. ``lastTransitionTime`` moves only when a
condition's status changes.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from kvpool.operator import api, children
from kvpool.operator.transfer import CONDITION as TRANSFER_HEALTHY
from kvpool.operator.transfer import NOT_MEASURED, TransferVerdict

# Reasons, as they appear in conditions and events.
INVALID_SPEC = "InvalidSpec"
APPLY_FAILED = "ApplyFailed"
CREATING = "CreatingChildren"
ROLLING_OUT = "RollingOut"
COMPLETE = "Complete"
ALL_READY = "AllReplicasReady"
NOT_READY = "ReplicasNotReady"
AS_EXPECTED = "AsExpected"

COMPONENTS = (*api.ROLES, "router")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a child Deployment reports: the facts status is made of."""

    spec_replicas: int | None
    replicas: int
    ready: int
    updated: int
    generation: int
    observed_generation: int

    @classmethod
    def from_deployment(cls, obj: Mapping[str, Any]) -> Workload:
        spec, st = obj.get("spec", {}), obj.get("status", {})
        return cls(
            spec_replicas=spec.get("replicas"),
            replicas=int(st.get("replicas", 0)),
            ready=int(st.get("readyReplicas", 0)),
            updated=int(st.get("updatedReplicas", 0)),
            generation=int(obj.get("metadata", {}).get("generation", 0)),
            observed_generation=int(st.get("observedGeneration", 0)),
        )

    def rolled_out(self, desired: int) -> bool:
        return (self.observed_generation >= self.generation and self.updated >= desired
                and self.replicas == desired)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(type_: str, ok: bool | str, reason: str, message: str, generation: int,
               previous: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    status = ok if isinstance(ok, str) else ("True" if ok else "False")
    before = previous.get(type_, {})
    since = before.get("lastTransitionTime") if before.get("status") == status else None
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or _now(),
        "observedGeneration": generation,
    }


def _desired(spec: api.KVCachePoolSpec, component: str, workload: Workload | None) -> int:
    if component == "router":
        return spec.router.replicas
    role: api.RoleSpec = getattr(spec, component)
    if role.autoscaled:  # the HPA owns the Deployment's replicas
        return workload.spec_replicas if workload and workload.spec_replicas is not None else 0
    return role.replicas


def compute(
    *,
    pool: children.PoolRef,
    generation: int,
    spec: api.KVCachePoolSpec | None,
    digest: str | None,
    endpoint: str | None,
    workloads: Mapping[str, Workload],
    missing: Sequence[str],
    problem: tuple[str, str] | None,
    previous: Sequence[Mapping[str, Any]] = (),
    transfer: TransferVerdict | None = None,
) -> dict[str, Any]:
    """The status of a pool.

    ``workloads`` maps a component (prefill, decode, router) to its Deployment's facts;
    ``missing`` names children not created yet; ``problem`` is ``(reason, message)`` when
    the operator cannot honour the spec (then ``spec`` may be None); ``transfer`` is the
    latest reading of the sidecars' health (None: not measured yet).
    """
    prev = {c.get("type", ""): c for c in previous}
    out: dict[str, Any] = {"observedGeneration": generation}
    if spec is not None:
        for component in COMPONENTS:
            w = workloads.get(component)
            desired = _desired(spec, component, w)
            ready = w.ready if w else 0
            entry: dict[str, Any] = {
                "desired": desired,
                "replicas": w.replicas if w else 0,
                "ready": ready,
                "readiness": f"{ready}/{desired}",
            }
            if component in api.ROLES:
                entry["selector"] = children.selector_string(pool.name, component)
            out[component] = entry
        out["routerEndpoint"] = endpoint
        out["inputsHash"] = digest

    if problem is not None:
        reason, message = problem
        conditions = [
            _condition("Ready", False, reason, message, generation, prev),
            _condition("Progressing", False, reason, message, generation, prev),
            _condition("Degraded", True, reason, message, generation, prev),
        ]
    else:
        assert spec is not None
        lagging = [
            f"{c} {out[c]['ready']}/{out[c]['desired']}"
            for c in COMPONENTS
            if out[c]["ready"] < out[c]["desired"]
        ]
        rolling = [
            c for c in COMPONENTS
            if c in workloads and not workloads[c].rolled_out(out[c]["desired"])
        ]
        if lagging:
            ready_cond = _condition("Ready", False, NOT_READY, "ready: " + ", ".join(lagging),
                                    generation, prev)
        else:
            ready_cond = _condition("Ready", True, ALL_READY, "every role has its pods ready",
                                    generation, prev)
        if missing:
            progressing = _condition("Progressing", True, CREATING,
                                     "creating " + ", ".join(missing), generation, prev)
        elif rolling:
            progressing = _condition("Progressing", True, ROLLING_OUT,
                                     "rolling out " + ", ".join(rolling), generation, prev)
        else:
            progressing = _condition("Progressing", False, COMPLETE,
                                     "children match the spec", generation, prev)
        degraded = _condition("Degraded", False, AS_EXPECTED, "", generation, prev)
        conditions = [ready_cond, progressing, degraded]
    if transfer is None:
        transfer = TransferVerdict.unknown(NOT_MEASURED, "the sidecars were not read yet")
    conditions.append(_condition(TRANSFER_HEALTHY, transfer.status, transfer.reason,
                                 transfer.message, generation, prev))
    if transfer.summary is not None:
        out["transfer"] = dict(transfer.summary)
    out["conditions"] = conditions
    return out


def same(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two statuses say the same thing (timestamps aside)."""
    def strip(s: Mapping[str, Any] | None) -> dict[str, Any]:
        s = dict(s or {})
        s["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in s.get("conditions", [])
        ]
        return s
    return strip(a) == strip(b)
