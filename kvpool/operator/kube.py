"""A thin client for raw Kubernetes objects: server-side apply, get, delete.

The operator's objects are plain dicts (rendered by :mod:`kvpool.operator.children`), so
this wraps the ``kubernetes`` package's ``ApiClient`` (authentication, TLS, token refresh)
without its typed models: a request is a path, a dict body and a JSON answer. Calls are
blocking; kopf runs the sync handlers that use them in its thread pool.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes

APPLY_PATCH = "application/apply-patch+yaml"  # JSON is YAML: the body is sent as JSON

_PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Event"): "events",
    ("v1", "Pod"): "pods",
    ("v1", "Secret"): "secrets",
    ("apps/v1", "Deployment"): "deployments",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("kvpool.dev/v1alpha1", "KVCachePool"): "kvcachepools",
    ("kopf.dev/v1", "ClusterKopfPeering"): "clusterkopfpeerings",
    ("kopf.dev/v1", "KopfPeering"): "kopfpeerings",
}
_CLUSTER_SCOPED = {"ClusterKopfPeering"}


class ApiError(Exception):
    """A non-2xx answer: ``status`` (HTTP), ``reason`` (Kubernetes reason) and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
         subresource: str | None = None) -> str:
    """The REST path of a collection or an object."""
    plural = _PLURALS[api_version, kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace is not None and kind not in _CLUSTER_SCOPED:
        base += f"/namespaces/{namespace}"
    out = f"{base}/{plural}"
    if name is not None:
        out += f"/{name}"
    if subresource is not None:
        out += f"/{subresource}"
    return out


def load_config() -> kubernetes.client.ApiClient:
    """An API client from the in-cluster service account, else the kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    return kubernetes.client.ApiClient()


class Client:
    """Raw-dict requests over one ``ApiClient`` (thread-safe: urllib3 pools connections)."""

    def __init__(self, api: kubernetes.client.ApiClient, timeout_s: float = 30.0) -> None:
        self.api = api
        self.timeout_s = timeout_s

    def request(self, method: str, url: str, *, body: Any = None,
                query: list[tuple[str, str]] | None = None,
                content_type: str = "application/json") -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if content_type == APPLY_PATCH and not isinstance(body, str):
            # Serialized here: the client's own walk over a dict body is slow, and a string
            # body is sent as is for non-JSON content types.
            body = json.dumps(body)
        m, full_url, hdrs, data, _ = self.api.param_serialize(
            method, url, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(m, full_url, header_params=hdrs, body=data,
                                     _request_timeout=self.timeout_s)
        raw: bytes = response.read()  # type: ignore[no-untyped-call]
        answer = json.loads(raw) if raw else {}
        if not 200 <= response.status < 300:
            raise ApiError(response.status, answer.get("reason", response.reason or ""),
                           answer.get("message", raw.decode(errors="replace")))
        return answer

    def apply(self, obj: dict[str, Any], field_manager: str, *,
              subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply ``obj`` (created when absent), taking over conflicting fields."""
        meta = obj["metadata"]
        url = path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"],
                   subresource)
        return self.request("PATCH", url, body=obj, content_type=APPLY_PATCH,
                            query=[("fieldManager", field_manager), ("force", "true")])

    def get(self, api_version: str, kind: str, namespace: str | None,
            name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None,
             label_selector: str = "") -> list[dict[str, Any]]:
        """The objects of a kind (in ``namespace``) that match ``label_selector``."""
        query = [("labelSelector", label_selector)] if label_selector else []
        answer = self.request("GET", path(api_version, kind, namespace), query=query)
        return list(answer.get("items") or [])

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return self.request("POST", path(obj["apiVersion"], obj["kind"], meta.get("namespace")),
                            body=obj)

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str,
               propagation: str = "Background") -> bool:
        """Delete an object; False when it was already gone."""
        try:
            self.request("DELETE", path(api_version, kind, namespace, name),
                         body={"apiVersion": "v1", "kind": "DeleteOptions",
                               "propagationPolicy": propagation})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
