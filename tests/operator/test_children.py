"""The pure rendering of a pool's children: golden files and the Kubernetes schemas.

Golden files live in tests/operator/golden/; after an intended change, regenerate them with
``KVPOOL_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/operator/test_children.py`` and
review the diff.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kvpool.operator import api, children, plan
from kvpool.operator.settings import RenderSettings

GOLDEN = pathlib.Path(__file__).parent / "golden"
K8S_VERSION = "1.33"
POOL = children.PoolRef("demo", "serving", "0b4a3d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e")
SETTINGS = RenderSettings(kvpool_image="ghcr.io/kvpool/kvpool:0.1.0")

CASES: dict[str, dict[str, Any]] = {
    "minimal": {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                "image": "vllm/vllm-openai:v0.11.0"},
    "full": {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama"},
        "image": "registry.example/vllm-kvpool:0.11.0",
        "prefill": {
            "replicas": 2, "autoscaled": True, "gpus": 2,
            "resources": {"requests": {"cpu": 8, "memory": "64Gi"}, "limits": {"memory": "96Gi"}},
            "vllmArgs": ["--max-model-len", "32768", "--enable-prefix-caching"],
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                             "effect": "NoSchedule"}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"kvpool.dev/role": "prefill"}}}}]}},
            "maxUnavailable": 0,
        },
        "decode": {"replicas": 4, "gpus": 1},
        "transfer": {"transport": "nixl", "codec": "cachegen", "level": "low",
                     "blockSize": 32, "chunkTokens": 512, "failurePolicy": "fail",
                     "timeoutMs": 2000, "tls": {"secretName": "llama-peer-certs"},
                     "profile": {"persistentVolumeClaim": {"claimName": "kv-profiles"},
                                 "path": "llama-3.1-8b/v1.kvprofile"}},
        "router": {"replicas": 2, "serviceType": "LoadBalancer", "port": 80},
        "sidecar": {"image": "registry.example/kvpool:0.1.0",
                    "resources": {"requests": {"cpu": 2, "memory": "8Gi"}}},
    },
}


def rendered(case: str) -> list[dict[str, Any]]:
    return children.render(POOL, api.load_spec(CASES[case]), SETTINGS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = yaml.safe_dump_all(rendered(case), sort_keys=False, width=1000)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("KVPOOL_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs: see the module docstring to update"


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_child_is_valid_kubernetes(case: str) -> None:
    for obj in rendered(case):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_render_is_deterministic_and_hash_follows_inputs() -> None:
    assert rendered("full") == rendered("full")
    spec = api.load_spec(CASES["minimal"])
    scaled = api.load_spec({**CASES["minimal"], "decode": {"replicas": 2}})
    assert children.inputs_hash(spec, SETTINGS) != children.inputs_hash(scaled, SETTINGS)
    other_image = RenderSettings(kvpool_image="kvpool:other")
    assert children.inputs_hash(spec, SETTINGS) != children.inputs_hash(spec, other_image)


def by_key(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_roles_get_connector_roles_gpus_and_shared_socket() -> None:
    objs = by_key(rendered("full"))
    for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        pod = objs["Deployment", f"demo-{role}"]["spec"]["template"]["spec"]
        vllm, sidecar = pod["containers"]
        assert vllm["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
        config = json.loads(vllm["args"][vllm["args"].index("--kv-transfer-config") + 1])
        assert config["kv_connector"] == "KVPoolConnector"
        assert config["kv_connector_module_path"] == "kvpool.sidecar.connector"
        assert config["kv_role"] == kv_role
        assert sidecar["command"] == ["kvpool", "sidecar"]
        shared = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}.items() & {
            m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}.items()
        assert {name for name, _ in shared} == {"kvpool-socket", "kvpool-shm"}
        paths = dict(shared)
        extra = config["kv_connector_extra_config"]
        assert extra["sidecar"].startswith(f"unix://{paths['kvpool-socket']}/")
        assert extra["shm_dir"] == paths["kvpool-shm"]
        assert sidecar["args"][sidecar["args"].index("--shm-dir") + 1] == paths["kvpool-shm"]
        volume = {v["name"]: v for v in pod["volumes"]}["kvpool-shm"]
        assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]
        assert "--block-size" in vllm["args"] and "32" in vllm["args"]
    prefill_vllm = objs["Deployment", "demo-prefill"]["spec"]["template"]["spec"]["containers"][0]
    assert prefill_vllm["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert prefill_vllm["args"][-3:] == ["--max-model-len", "32768", "--enable-prefix-caching"]


IMAGE = "registry.example/profiles/smollm:v1"
PROFILE_SOURCES = {  # the pool's source -> the pod's volume
    "claim": ({"persistentVolumeClaim": {"claimName": "kv-profiles"}},
              {"persistentVolumeClaim": {"claimName": "kv-profiles", "readOnly": True}}),
    "claim-read-write": ({"persistentVolumeClaim": {"claimName": "p", "readOnly": False}},
                         {"persistentVolumeClaim": {"claimName": "p", "readOnly": False}}),
    "image": ({"image": {"reference": IMAGE}}, {"image": {"reference": IMAGE}}),
    "image-pull-policy": ({"image": {"reference": IMAGE, "pullPolicy": "Always"}},
                          {"image": {"reference": IMAGE, "pullPolicy": "Always"}}),
}


@pytest.mark.parametrize("source", sorted(PROFILE_SOURCES))
def test_profile_volume_is_mounted_read_only_into_every_sidecar(source: str) -> None:
    """One volume for both roles, so that prefill and decode hold the same file; mounted
    into the sidecar only, read-only, and named by --profile."""
    given, volume = PROFILE_SOURCES[source]
    spec = api.load_spec({**CASES["minimal"], "transfer": {
        "level": "default", "profile": {**given, "path": "smollm/v1.kvprofile"}}})
    objects = children.render(POOL, spec, SETTINGS)
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    objs = by_key(objects)
    for role in api.ROLES:
        pod = objs["Deployment", f"demo-{role}"]["spec"]["template"]["spec"]
        assert {"name": "kvpool-profile", **volume} in pod["volumes"]
        vllm, sidecar = pod["containers"]
        assert {"name": "kvpool-profile", "mountPath": children.PROFILE_DIR,
                "readOnly": True} in sidecar["volumeMounts"]
        assert all(m["name"] != "kvpool-profile" for m in vllm["volumeMounts"])
        flag = sidecar["args"].index("--profile")
        assert sidecar["args"][flag + 1] == f"{children.PROFILE_DIR}/smollm/v1.kvprofile"


def test_no_profile_no_volume_no_flag() -> None:
    for obj in rendered("minimal"):
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] != "demo-router":
            pod = obj["spec"]["template"]["spec"]
            assert all(v["name"] != "kvpool-profile" for v in pod["volumes"])
            assert "--profile" not in pod["containers"][1]["args"]


def test_autoscaled_role_leaves_replicas_to_the_hpa() -> None:
    objs = by_key(rendered("full"))
    assert "replicas" not in objs["Deployment", "demo-prefill"]["spec"]
    assert objs["Deployment", "demo-decode"]["spec"]["replicas"] == 4


def test_children_are_owned_and_selectors_match_their_pods() -> None:
    for obj in rendered("minimal"):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == ("KVCachePool", "demo", POOL.uid)
        assert obj["metadata"]["namespace"] == "serving"
        if obj["kind"] in ("Deployment", "PodDisruptionBudget"):
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selector == children.role_selector("demo", obj["metadata"]["labels"][
                children.ROLE_LABEL])
        if obj["kind"] == "Deployment":
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_config_change_rolls_the_pods() -> None:
    base = by_key(rendered("minimal"))
    spec = api.load_spec({**CASES["minimal"], "transfer": {"codec": "raw"}})
    changed = by_key(children.render(POOL, spec, SETTINGS))
    key = ("Deployment", "demo-decode")
    annotation = children.CONFIG_HASH_ANNOTATION
    assert (base[key]["spec"]["template"]["metadata"]["annotations"][annotation]
            != changed[key]["spec"]["template"]["metadata"]["annotations"][annotation])
    assert changed["ConfigMap", "demo-transfer"]["data"]["KVPOOL_LEVEL"] == "raw"


def test_contains_ignores_what_the_api_server_adds() -> None:
    desired = rendered("minimal")[2]
    live = json.loads(json.dumps(desired))
    live["metadata"]["uid"] = "x"
    live["status"] = {"replicas": 1}
    live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent"
    assert plan.contains(live, desired)
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "other"
    assert not plan.contains(live, desired)
    assert plan.contains({"limits": {"nvidia.com/gpu": "1"}}, {"limits": {"nvidia.com/gpu": 1}})
