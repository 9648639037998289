"""The Kubernetes API permissions the operator needs: least privilege, as RBAC rules.

The Helm chart's ClusterRole (or Role, when the operator watches one namespace) lists
exactly these rules; a test renders the chart and compares. Why each one is needed:

- ``kvcachepools``: watch the pools, patch them (kopf's finalizer and progress
  annotations); ``kvcachepools/status``: write status (server-side apply).
- ``deployments``, ``services``, ``configmaps``, ``poddisruptionbudgets``: the children
  — server-side apply is a PATCH (which creates when absent); watch them to put back a
  deleted or hand-edited child and to read readiness; delete them when the pool goes.
- ``secrets`` (create only: the operator never reads a Secret): the TLS Secret it
  generates for a pool that asks for mTLS and names none; an existing one (409) is kept.
- ``pods`` (list): the pool's worker pods, whose sidecars' ``/transfer/health`` the
  operator reads into the ``TransferHealthy`` condition.
- ``events``: report what happened (kopf posts through core/v1).
- ``clusterkopfpeerings`` / ``kopfpeerings``: kopf peering, so that of several replicas
  only one acts at a time (the operator creates its peering object when absent).
- ``namespaces`` and ``customresourcedefinitions``: kopf watches namespaces to follow
  ``--namespace`` globs and reads CRDs to discover resources; read-only.
"""

from __future__ import annotations

from typing import Any

READ = ["get", "list", "watch"]
OWN = [*READ, "create", "patch", "update", "delete"]

CLUSTER_RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": ["kvpool.dev"], "resources": ["kvcachepools"], "verbs": [*READ, "patch", "update"]},
    {"apiGroups": ["kvpool.dev"], "resources": ["kvcachepools/status"], "verbs": ["get", "patch", "update"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": OWN},
    {"apiGroups": [""], "resources": ["services", "configmaps"], "verbs": OWN},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": OWN},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"],
     "verbs": [*READ, "create", "patch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": READ},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": READ},
)
"""RBAC ``rules`` of the operator's ClusterRole (cluster-wide operation, the default)."""


def rules() -> list[dict[str, Any]]:
    """A fresh copy of :data:`CLUSTER_RULES` (safe to modify)."""
    return [{k: list(v) for k, v in rule.items()} for rule in CLUSTER_RULES]
