"""Fixtures of the e2e tests: the cluster of the current kube context, the installed chart,
and a pool of the tests' own in a namespace of its own.

Every test here skips, with the reason, when no cluster is reachable. Settings (environment):
KVPOOL_E2E_POOL (a pool manifest; default examples/pool.yaml where a node has GPUs, else
examples/pool-cpu.yaml) and KVPOOL_E2E_TIMEOUT (seconds a pool may take to become Ready,
model download included; default 1200).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3
import yaml

from kvpool import k8s_tools
from kvpool.operator import api

ROOT = Path(__file__).resolve().parents[1]
CREATE_CLUSTER = "create one with `e2e/cluster.sh up cpu` (see e2e/README.md)"


@pytest.fixture(scope="session")
def k8s() -> Iterator[kubernetes.client.ApiClient]:
    """An API client for the current kube context; skips the test when none answers."""
    try:
        kubernetes.config.load_kube_config()
        _, context = kubernetes.config.list_kube_config_contexts()
    except (kubernetes.config.ConfigException, OSError) as exc:
        pytest.skip(f"no Kubernetes cluster: no usable kube config ({exc}); {CREATE_CLUSTER}")
    client = kubernetes.client.ApiClient()
    try:
        kubernetes.client.VersionApi(client).get_code(_request_timeout=5)
    except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        client.close()
        pytest.skip(
            f"no reachable Kubernetes cluster in kube context {context['name']!r} "
            f"({type(exc).__name__}: {exc}); {CREATE_CLUSTER}"
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def operator_installed(k8s: kubernetes.client.ApiClient) -> None:
    """The chart is installed: the CRD is established and an operator replica is available."""
    extensions = kubernetes.client.ApiextensionsV1Api(k8s)
    try:
        crd = extensions.read_custom_resource_definition(f"{api.PLURAL}.{api.GROUP}")
    except kubernetes.client.ApiException as exc:
        if exc.status != 404:
            raise
        pytest.fail(f"the cluster has no {api.PLURAL}.{api.GROUP} CRD: install the chart "
                    "(`e2e/cluster.sh up cpu` or `helm install kvpool charts/kvpool`)")
    conditions = {c.type: c.status for c in (crd.status and crd.status.conditions) or ()}
    assert conditions.get("Established") == "True", f"CRD not established: {conditions}"
    operators = kubernetes.client.AppsV1Api(k8s).list_deployment_for_all_namespaces(
        label_selector="app.kubernetes.io/name=kvpool,app.kubernetes.io/component=operator"
    ).items
    assert any(((d.status and d.status.available_replicas) or 0) >= 1 for d in operators), (
        "no available kvpool operator Deployment: check `kubectl get deploy -A "
        "-l app.kubernetes.io/component=operator`"
    )


@dataclass(frozen=True)
class Pool:
    """The pool under test and where it lives."""

    namespace: str
    name: str
    manifest: dict[str, Any]

    @property
    def served_name(self) -> str:
        model = self.manifest["spec"]["model"]
        return model.get("servedName") or model["name"]


def _cluster_has_gpus(k8s: kubernetes.client.ApiClient) -> bool:
    nodes = kubernetes.client.CoreV1Api(k8s).list_node().items
    return any(int(((n.status and n.status.allocatable) or {}).get("nvidia.com/gpu", "0")) > 0
               for n in nodes)


@pytest.fixture(scope="module")
def pool(k8s: kubernetes.client.ApiClient, operator_installed: None) -> Iterator[Pool]:
    """The example pool (GPU or CPU, after the cluster), created in a fresh namespace that is
    deleted afterwards, whatever the tests did."""
    default = "examples/pool.yaml" if _cluster_has_gpus(k8s) else "examples/pool-cpu.yaml"
    manifest = yaml.safe_load((ROOT / os.environ.get("KVPOOL_E2E_POOL", default)).read_text())
    namespace = f"kvpool-e2e-{uuid.uuid4().hex[:6]}"
    core = kubernetes.client.CoreV1Api(k8s)
    core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(
        name=namespace, labels={"kvpool.dev/e2e": "true"})))
    try:
        kubernetes.client.CustomObjectsApi(k8s).create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, manifest
        )
        yield Pool(namespace, manifest["metadata"]["name"], manifest)
    finally:
        core.delete_namespace(namespace, propagation_policy="Foreground")


def kubectl() -> str:
    return shutil.which("kubectl") or str(k8s_tools.tool("kubectl"))


@pytest.fixture
def port_forward() -> Iterator[Any]:
    """``port_forward(namespace, service, port) -> local URL`` through ``kubectl port-forward``
    (stopped after the test)."""
    procs: list[subprocess.Popen[str]] = []

    def start(namespace: str, service: str, port: int) -> str:
        proc = subprocess.Popen(
            [kubectl(), "port-forward", "--namespace", namespace, "--address", "127.0.0.1",
             f"service/{service}", f":{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl port-forward said: {line!r}"
        return f"http://127.0.0.1:{match[1]}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)
