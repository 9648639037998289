"""A KVCachePool on a real cluster, end to end: it becomes Ready, serves a completion through
its router, scales its decode role, and leaves nothing behind when deleted.

The tests run in file order on one pool (the ``pool`` fixture of conftest.py).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit

import kubernetes
import pytest

from kvpool.operator import api

if TYPE_CHECKING:
    from conftest import Pool

pytestmark = pytest.mark.e2e
T = TypeVar("T")
READY_TIMEOUT_S = float(os.environ.get("KVPOOL_E2E_TIMEOUT", "1200"))
"""Seconds a pool may take to become Ready (image pull, model download, engine start)."""


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 3) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def read_pool(k8s: kubernetes.client.ApiClient, pool: Pool) -> dict[str, Any]:
    custom = kubernetes.client.CustomObjectsApi(k8s)
    return cast(dict[str, Any], custom.get_namespaced_custom_object(
        api.GROUP, api.VERSION, pool.namespace, api.PLURAL, pool.name))


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def ready_pool(k8s: kubernetes.client.ApiClient, pool: Pool) -> dict[str, Any] | None:
    obj = read_pool(k8s, pool)
    return obj if condition(obj, "Ready").get("status") == "True" else None


def children(k8s: kubernetes.client.ApiClient, pool: Pool) -> dict[str, list[Any]]:
    """The pool's objects of every kind the operator makes, found by the instance label."""
    selector = f"app.kubernetes.io/instance={pool.name}"
    core = kubernetes.client.CoreV1Api(k8s)
    ns = pool.namespace
    return {
        "Deployment": kubernetes.client.AppsV1Api(k8s).list_namespaced_deployment(
            ns, label_selector=selector).items,
        "Service": core.list_namespaced_service(ns, label_selector=selector).items,
        "ConfigMap": core.list_namespaced_config_map(ns, label_selector=selector).items,
        "PodDisruptionBudget": kubernetes.client.PolicyV1Api(k8s)
        .list_namespaced_pod_disruption_budget(ns, label_selector=selector).items,
        "Pod": core.list_namespaced_pod(ns, label_selector=selector).items,
    }


def complete(base_url: str, model: str, prompt: str) -> dict[str, Any]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0})
    request = urllib.request.Request(
        f"{base_url}/v1/completions", data=body.encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        return json.load(response)


def router_url(obj: dict[str, Any], pool: Pool, port_forward: Callable[..., str]) -> str:
    """A local URL for the pool's router Service, from status.routerEndpoint."""
    endpoint = urlsplit(obj["status"]["routerEndpoint"])
    service = endpoint.hostname.split(".")[0]
    return port_forward(pool.namespace, service, endpoint.port or 80)


def test_pool_becomes_ready(k8s: kubernetes.client.ApiClient, pool: Pool) -> None:
    obj = wait_for(f"pool {pool.namespace}/{pool.name} Ready", lambda: ready_pool(k8s, pool),
                   READY_TIMEOUT_S, every_s=10)
    status = obj["status"]
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    for role in api.ROLES:
        assert status[role]["ready"] == status[role]["desired"] == \
            obj["spec"][role].get("replicas", 1)
    assert condition(obj, "Degraded").get("status") != "True"
    owned = children(k8s, pool)
    assert len(owned["Deployment"]) == 3  # prefill, decode, router
    for kind in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget"):
        assert owned[kind], f"no {kind} for the pool"
        for child in owned[kind]:
            owners = child.metadata.owner_references or []
            assert [o.uid for o in owners] == [obj["metadata"]["uid"]], child.metadata.name


def test_completion_through_the_router(
    k8s: kubernetes.client.ApiClient, pool: Pool, port_forward: Callable[..., str]
) -> None:
    base = router_url(read_pool(k8s, pool), pool, port_forward)
    reply = complete(base, pool.served_name, "The capital of France is")
    assert reply["choices"][0]["text"].strip()
    assert reply["usage"]["completion_tokens"] > 0


def test_scale_decode(
    k8s: kubernetes.client.ApiClient, pool: Pool, port_forward: Callable[..., str]
) -> None:
    custom = kubernetes.client.CustomObjectsApi(k8s)
    scale = cast(dict[str, Any], custom.get_namespaced_custom_object_scale(
        api.GROUP, api.VERSION, pool.namespace, api.PLURAL, pool.name))
    wanted = scale["spec"]["replicas"] + 1
    custom.patch_namespaced_custom_object_scale(
        api.GROUP, api.VERSION, pool.namespace, api.PLURAL, pool.name,
        {"spec": {"replicas": wanted}})

    def scaled() -> dict[str, Any] | None:
        obj = read_pool(k8s, pool)
        decode = obj.get("status", {}).get("decode", {})
        return obj if decode.get("ready") == wanted and ready_pool(k8s, pool) else None

    obj = wait_for(f"{wanted} ready decode pods", scaled, READY_TIMEOUT_S, every_s=10)
    decode = [d for d in children(k8s, pool)["Deployment"]
              if d.metadata.name == f"{pool.name}-decode"]
    assert decode and decode[0].spec.replicas == wanted
    assert obj["status"]["decode"]["readiness"] == f"{wanted}/{wanted}"
    reply = complete(router_url(obj, pool, port_forward), pool.served_name, "One, two, three,")
    assert reply["choices"][0]["text"].strip()


def test_delete_leaves_nothing(k8s: kubernetes.client.ApiClient, pool: Pool) -> None:
    kubernetes.client.CustomObjectsApi(k8s).delete_namespaced_custom_object(
        api.GROUP, api.VERSION, pool.namespace, api.PLURAL, pool.name)

    def gone() -> bool:
        try:
            read_pool(k8s, pool)
        except kubernetes.client.ApiException as exc:
            return exc.status == 404
        return False

    wait_for("the pool to be deleted (finalizers done)", gone, 300)
    wait_for("every child and pod of the pool to be gone",
             lambda: not any(children(k8s, pool).values()), 300)
