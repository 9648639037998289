"""The real operator (subprocess) against the API emulator: every behaviour asserted on objects.

The emulator runs no controllers, so where a test needs ready pods it plays the
Deployment controller itself by writing the Deployments' status.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvpool.operator import api, kube
from kvpool.sidecar import tls
from tests.operator.conftest import wait_for

NS = "default"
MERGE = "application/merge-patch+json"
CHILD_KINDS = (("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment"),
               ("policy/v1", "PodDisruptionBudget"))
EXPECTED = {
    ("ConfigMap", "{p}-transfer"), ("Service", "{p}"), ("Service", "{p}-prefill"),
    ("Service", "{p}-decode"), ("Deployment", "{p}-prefill"), ("Deployment", "{p}-decode"),
    ("Deployment", "{p}-router"), ("PodDisruptionBudget", "{p}-prefill"),
    ("PodDisruptionBudget", "{p}-decode"), ("PodDisruptionBudget", "{p}-router"),
}

pytestmark = pytest.mark.usefixtures("operator")


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    body = {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "image": "vllm/vllm-openai:v0.11.0", **spec}
    return {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": name, "namespace": NS}, "spec": body}


def get_pool(client: kube.Client, name: str) -> dict[str, Any] | None:
    return client.get(api.API_VERSION, api.KIND, NS, name)


def children_of(client: kube.Client, pool: str) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for api_version, kind in CHILD_KINDS:
        listing = client.request("GET", kube.path(api_version, kind, NS))
        for item in listing["items"]:
            if item["metadata"].get("labels", {}).get("kvpool.dev/pool") == pool:
                out[kind, item["metadata"]["name"]] = item
    return out


def expected(pool: str) -> set[tuple[str, str]]:
    return {(kind, name.format(p=pool)) for kind, name in EXPECTED}


def condition(pool: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in (pool or {}).get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return c
    return {}


def patch_pool(client: kube.Client, name: str, spec: dict[str, Any]) -> None:
    client.request("PATCH", kube.path(api.API_VERSION, api.KIND, NS, name),
                   body={"spec": spec}, content_type=MERGE)


def settled(client: kube.Client, name: str, generation: int) -> dict[str, Any] | None:
    """The pool once its status describes ``generation`` and all its children exist."""
    pool = get_pool(client, name)
    if not pool or pool.get("status", {}).get("observedGeneration") != generation:
        return None
    if not pool["status"].get("inputsHash"):
        return None
    return pool if expected(name) <= set(children_of(client, name)) else None


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"]
                if c["name"] == name)


def play_deployment_controller(client: kube.Client, pool: str) -> None:
    """Mark every Deployment of ``pool`` rolled out with all replicas ready."""
    for (kind, name), obj in children_of(client, pool).items():
        if kind != "Deployment":
            continue
        n = obj["spec"].get("replicas", 1)
        st = {"observedGeneration": obj["metadata"]["generation"], "replicas": n,
              "readyReplicas": n, "updatedReplicas": n, "availableReplicas": n}
        client.request("PATCH", kube.path("apps/v1", "Deployment", NS, name, "status"),
                       body={"status": st}, content_type=MERGE)


def test_create_renders_children_with_owner_and_status(client: kube.Client) -> None:
    created = client.create(manifest("alpha"))
    pool = wait_for(lambda: settled(client, "alpha", 1), what="alpha's children and status")
    kids = children_of(client, "alpha")
    assert set(kids) == expected("alpha")
    for obj in kids.values():
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == created["metadata"]["uid"] and ref["controller"] is True
        assert obj["metadata"]["annotations"]["kvpool.dev/inputs-hash"] == \
            pool["status"]["inputsHash"]
    prefill = container(kids["Deployment", "alpha-prefill"], "vllm")
    transfer = json.loads(prefill["args"][prefill["args"].index("--kv-transfer-config") + 1])
    assert transfer["kv_role"] == "kv_producer"
    assert container(kids["Deployment", "alpha-router"], "router")["image"] == "kvpool:test"
    assert pool["status"]["prefill"]["readiness"] == "0/1"
    assert condition(pool, "Ready")["status"] == "False"
    assert condition(pool, "Ready")["reason"] == "ReplicasNotReady"
    assert condition(pool, "Degraded")["status"] == "False"
    assert pool["status"]["routerEndpoint"] == "http://alpha.default.svc.cluster.local:8000/v1"

    play_deployment_controller(client, "alpha")
    ready = wait_for(lambda: condition(get_pool(client, "alpha"), "Ready").get("status") == "True"
                     and get_pool(client, "alpha"), what="alpha Ready=True")
    assert ready["status"]["decode"]["readiness"] == "1/1"
    assert condition(ready, "Progressing")["status"] == "False"


def test_update_scales_and_changes_image(client: kube.Client) -> None:
    client.create(manifest("bravo"))
    wait_for(lambda: settled(client, "bravo", 1), what="bravo created")
    patch_pool(client, "bravo", {"decode": {"replicas": 3}, "image": "vllm/vllm-openai:v0.12.0"})
    pool = wait_for(lambda: settled(client, "bravo", 2), what="bravo generation 2")
    kids = children_of(client, "bravo")
    assert kids["Deployment", "bravo-decode"]["spec"]["replicas"] == 3
    assert kids["Deployment", "bravo-prefill"]["spec"]["replicas"] == 1
    for role in ("prefill", "decode"):
        image = container(kids["Deployment", f"bravo-{role}"], "vllm")["image"]
        assert image == "vllm/vllm-openai:v0.12.0"
    assert pool["status"]["decode"]["desired"] == 3
    assert pool["status"]["decode"]["readiness"] == "0/3"


def test_deleted_and_edited_children_are_put_back(client: kube.Client) -> None:
    client.create(manifest("charlie"))
    wait_for(lambda: settled(client, "charlie", 1), what="charlie created")
    before = children_of(client, "charlie")

    assert client.delete("apps/v1", "Deployment", NS, "charlie-decode")
    assert client.delete("v1", "Service", NS, "charlie")
    restored = wait_for(
        lambda: (kids := children_of(client, "charlie")).keys() >= {
            ("Deployment", "charlie-decode"), ("Service", "charlie")} and kids,
        what="deleted children restored")
    new_uid = restored["Deployment", "charlie-decode"]["metadata"]["uid"]
    assert new_uid != before["Deployment", "charlie-decode"]["metadata"]["uid"]

    edited = before["Deployment", "charlie-prefill"]
    containers = edited["spec"]["template"]["spec"]["containers"]
    containers[0]["image"] = "attacker/image:latest"
    client.request("PATCH", kube.path("apps/v1", "Deployment", NS, "charlie-prefill"),
                   body={"spec": {"replicas": 7, "template": {"spec": {"containers": containers}}}},
                   content_type=MERGE)
    fixed = wait_for(
        lambda: (d := client.get("apps/v1", "Deployment", NS, "charlie-prefill"))
        and container(d, "vllm")["image"] == "vllm/vllm-openai:v0.11.0"
        and d["spec"]["replicas"] == 1 and d,
        what="hand-edited Deployment restored")
    assert fixed["metadata"]["ownerReferences"][0]["name"] == "charlie"


def test_autoscaled_role_keeps_the_replicas_an_hpa_sets(client: kube.Client) -> None:
    client.create(manifest("hotel", prefill={"autoscaled": True}))
    wait_for(lambda: settled(client, "hotel", 1), what="hotel created")
    prefill = client.get("apps/v1", "Deployment", NS, "hotel-prefill")
    assert "replicas" not in prefill["spec"]

    # What an HPA does through the Deployment's scale subresource.
    client.request("PATCH", kube.path("apps/v1", "Deployment", NS, "hotel-prefill"),
                   body={"spec": {"replicas": 3}}, content_type=MERGE)
    pool = wait_for(lambda: (p := get_pool(client, "hotel"))
                    and p["status"]["prefill"]["desired"] == 3 and p,
                    what="status following the HPA's choice")
    assert pool["status"]["prefill"]["readiness"] == "0/3"
    assert client.get("apps/v1", "Deployment", NS, "hotel-prefill")["spec"]["replicas"] == 3


def events_for(client: kube.Client, name: str) -> list[dict[str, Any]]:
    listing = client.request("GET", kube.path("v1", "Event", NS))
    return [e for e in listing["items"] if e.get("involvedObject", {}).get("name") == name]


def test_invalid_spec_is_a_condition_and_an_event(client: kube.Client) -> None:
    bad = manifest("delta", transfer={"transport": "nixl"},
                   prefill={"gpus": 0}, decode={"gpus": 0})
    client.create(bad)
    pool = wait_for(lambda: condition(get_pool(client, "delta"), "Degraded").get("status")
                    == "True" and get_pool(client, "delta"), what="delta Degraded")
    degraded = condition(pool, "Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert "transport nixl needs a GPU" in degraded["message"]
    assert condition(pool, "Ready")["status"] == "False"
    warning = wait_for(lambda: [e for e in events_for(client, "delta")
                                if e.get("reason") == "InvalidSpec"], what="a Warning event")
    assert warning[0]["type"] == "Warning" and "nixl" in warning[0]["message"]
    assert children_of(client, "delta") == {}

    # A malformed field is reported the same way (the emulator has no schema validation).
    patch_pool(client, "delta", {"decode": {"replicas": "three"}})
    pool = wait_for(lambda: "spec.decode.replicas" in condition(
        get_pool(client, "delta"), "Degraded").get("message", "") and get_pool(client, "delta"),
        what="schema error reported")
    assert "must be of type int" in condition(pool, "Degraded")["message"]

    # Fixing the spec brings the pool up; the operator did not give up on it.
    patch_pool(client, "delta", {"decode": {"replicas": 1, "gpus": 1}, "prefill": {"gpus": 1}})
    pool = wait_for(lambda: settled(client, "delta", 3), what="delta fixed")
    assert condition(pool, "Degraded")["status"] == "False"


def test_delete_removes_children_and_releases_the_pool(client: kube.Client) -> None:
    client.create(manifest("echo"))
    wait_for(lambda: settled(client, "echo", 1), what="echo created")
    client.delete(api.API_VERSION, api.KIND, NS, "echo")
    wait_for(lambda: get_pool(client, "echo") is None, what="echo's finalizer released")
    wait_for(lambda: children_of(client, "echo") == {}, what="echo's children deleted")


def test_liveness_endpoint_reports_pools(operator: tuple[Any, int]) -> None:
    _, port = operator
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert response.status == 200
        assert "pools" in json.loads(response.read())


def test_mtls_secret_is_generated_once_owned_and_mounted(client: kube.Client,
                                                         tmp_path: Path) -> None:
    created = client.create(manifest("tango"))
    wait_for(lambda: settled(client, "tango", 1), what="tango created")
    secret = wait_for(lambda: client.get("v1", "Secret", NS, "tango-sidecar-tls"),
                      what="tango's TLS Secret")
    assert secret["type"] == "kubernetes.io/tls"
    (ref,) = secret["metadata"]["ownerReferences"]
    assert ref["uid"] == created["metadata"]["uid"]
    for name, data in secret["data"].items():  # a bundle the sidecar accepts
        (tmp_path / name).write_bytes(base64.b64decode(data))
    tls.load_bundle(tmp_path)
    decode = children_of(client, "tango")["Deployment", "tango-decode"]
    volumes = decode["spec"]["template"]["spec"]["volumes"]
    assert {"secretName": "tango-sidecar-tls", "defaultMode": 0o440} in \
        [v.get("secret") for v in volumes]
    assert "--tls-dir" in container(decode, "sidecar")["args"]

    patch_pool(client, "tango", {"decode": {"replicas": 2}})
    wait_for(lambda: settled(client, "tango", 2), what="tango generation 2")
    again = client.get("v1", "Secret", NS, "tango-sidecar-tls")
    assert again["data"] == secret["data"], "the certificates were generated anew"


def test_named_secret_or_plaintext_generates_none(client: kube.Client) -> None:
    client.create(manifest("uniform", transfer={"tls": {"secretName": "uniform-certs"}}))
    client.create(manifest("victor", transfer={"tls": {"mode": "plaintext"}}))
    for name in ("uniform", "victor"):
        wait_for(lambda name=name: settled(client, name, 1), what=f"{name} created")
        assert client.get("v1", "Secret", NS, f"{name}-sidecar-tls") is None
    named = children_of(client, "uniform")["Deployment", "uniform-prefill"]
    assert {"secretName": "uniform-certs", "defaultMode": 0o440} in \
        [v.get("secret") for v in named["spec"]["template"]["spec"]["volumes"]]
    plain = children_of(client, "victor")["Deployment", "victor-prefill"]
    assert "--tls-dir" not in container(plain, "sidecar")["args"]
    assert "grpc" in container(plain, "sidecar")["readinessProbe"]
