"""The pure function from a pool to its desired child objects.

``render(pool, spec, settings)`` returns, in apply order: the transfer ConfigMap, the
headless Service and Deployment of each role (vLLM + kvpool sidecar), the router
Deployment and Service, and a PodDisruptionBudget per Deployment. No I/O, no clock: the
same inputs give the same objects (golden tests pin them), every object carries an
owner reference to the pool and the hash of the inputs it was rendered from.

Contract with the data plane (what the pods run):

- vLLM: ``python -m vllm.entrypoints.openai.api_server`` with ``--kv-transfer-config``
  naming ``KVPoolConnector`` from ``kvpool.sidecar.connector`` (``kv_producer`` on
  prefill, ``kv_consumer`` on decode) and the sidecar's socket in
  ``kv_connector_extra_config``.
- sidecar: ``kvpool sidecar --role ROLE --socket PATH --port P --metrics-port M``, the
  transfer settings from the ConfigMap as ``KVPOOL_*`` environment variables.
- router: ``kvpool router --port P --prefill HOST:PORT --decode HOST:PORT`` where the
  hosts are the roles' headless Services (they resolve to every ready pod).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from kvpool.operator import api, schema
from kvpool.operator.settings import RenderSettings

MANAGED_BY = "kvpool-operator"
POOL_LABEL = "kvpool.dev/pool"
ROLE_LABEL = "kvpool.dev/role"
HASH_ANNOTATION = "kvpool.dev/inputs-hash"
CONFIG_HASH_ANNOTATION = "kvpool.dev/config-hash"

CONNECTOR = "KVPoolConnector"
CONNECTOR_MODULE = "kvpool.sidecar.connector"
KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}
SOCKET_NAME = "sidecar.sock"


@dataclasses.dataclass(frozen=True)
class PoolRef:
    """The identity of a pool: what owner references and names are made of."""

    name: str
    namespace: str
    uid: str


def inputs_hash(spec: api.KVCachePoolSpec, settings: RenderSettings) -> str:
    """A short, stable hash of everything the children depend on."""
    doc = {"spec": schema.dump(spec), "settings": dataclasses.asdict(settings)}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def role_selector(pool: str, role: str) -> dict[str, str]:
    return {POOL_LABEL: pool, ROLE_LABEL: role}


def selector_string(pool: str, role: str) -> str:
    """The role's label selector as a string (status.<role>.selector, for /scale)."""
    return ",".join(f"{k}={v}" for k, v in role_selector(pool, role).items())


def _labels(pool: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kvpool",
        "app.kubernetes.io/instance": pool,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **role_selector(pool, component),
    }


def _metadata(pool: PoolRef, name: str, component: str, digest: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": pool.namespace,
        "labels": _labels(pool.name, component),
        "annotations": {HASH_ANNOTATION: digest},
        "ownerReferences": [
            {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": pool.name,
                "uid": pool.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def config_map_name(pool: str) -> str:
    return f"{pool}-transfer"


def transfer_env(spec: api.KVCachePoolSpec) -> dict[str, str]:
    """The transfer and codec settings as the sidecars read them (``KVPOOL_*``)."""
    t = spec.transfer
    return {
        "KVPOOL_MODEL": spec.model.name,
        "KVPOOL_TRANSPORT": t.transport,
        "KVPOOL_CODEC": t.codec,
        "KVPOOL_LEVEL": t.level,
        "KVPOOL_LOSSLESS": "true" if t.lossless else "false",
        "KVPOOL_BLOCK_SIZE": str(t.block_size),
        "KVPOOL_CHUNK_TOKENS": str(t.chunk_tokens),
        "KVPOOL_FAILURE_POLICY": t.failure_policy,
        "KVPOOL_TIMEOUT_MS": str(t.timeout_ms),
    }


def _config_map(pool: PoolRef, spec: api.KVCachePoolSpec, digest: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(pool, config_map_name(pool.name), "transfer", digest),
        "data": transfer_env(spec),
    }


def _resources(res: api.Resources, gpus: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if res.requests:
        out["requests"] = dict(res.requests)
    limits: dict[str, int | str] = dict(res.limits)
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    if limits:
        out["limits"] = limits
    return out


def _http_probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _kv_transfer_config(role: str, settings: RenderSettings) -> str:
    config = {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": KV_ROLES[role],
        "kv_connector_extra_config": {"socket": f"{settings.socket_dir}/{SOCKET_NAME}"},
    }
    return json.dumps(config, separators=(",", ":"))


def _vllm_container(
    pool: PoolRef, role: str, spec: api.KVCachePoolSpec, settings: RenderSettings
) -> dict[str, Any]:
    r: api.RoleSpec = getattr(spec, role)
    args = [
        "--model", spec.model.name,
        "--served-model-name", spec.model.served_name or spec.model.name,
        "--host", "0.0.0.0",
        "--port", str(settings.vllm_port),
        "--block-size", str(spec.transfer.block_size),
        "--kv-transfer-config", _kv_transfer_config(role, settings),
    ]
    if r.gpus > 1:
        args += ["--tensor-parallel-size", str(r.gpus)]
    args += r.vllm_args
    container: dict[str, Any] = {
        "name": "vllm",
        "image": spec.image,
        "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "args": args,
        "ports": [{"name": "http", "containerPort": settings.vllm_port, "protocol": "TCP"}],
        "env": [{"name": "KVPOOL_ROLE", "value": role}],
        "envFrom": [{"configMapRef": {"name": config_map_name(pool.name)}}],
        "volumeMounts": [
            {"name": "kvpool-socket", "mountPath": settings.socket_dir},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        # Loading a model takes minutes: the startup probe allows 30 min before liveness.
        "startupProbe": _http_probe("/health", "http", 10, 180),
        "readinessProbe": _http_probe("/health", "http", 5, 3),
        "livenessProbe": _http_probe("/health", "http", 10, 6),
    }
    resources = _resources(r.resources, r.gpus)
    if resources:
        container["resources"] = resources
    return container


def _sidecar_container(
    pool: PoolRef, role: str, spec: api.KVCachePoolSpec, settings: RenderSettings
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "sidecar",
        "image": spec.sidecar.image or settings.kvpool_image,
        "command": ["kvpool", "sidecar"],
        "args": [
            "--role", role,
            "--socket", f"{settings.socket_dir}/{SOCKET_NAME}",
            "--port", str(settings.sidecar_port),
            "--metrics-port", str(settings.sidecar_metrics_port),
        ],
        "ports": [
            {"name": "kv", "containerPort": settings.sidecar_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": settings.sidecar_metrics_port, "protocol": "TCP"},
        ],
        "env": [
            {"name": "KVPOOL_ROLE", "value": role},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "envFrom": [{"configMapRef": {"name": config_map_name(pool.name)}}],
        "volumeMounts": [{"name": "kvpool-socket", "mountPath": settings.socket_dir}],
        "readinessProbe": _http_probe("/healthz", "metrics", 5, 3),
        "livenessProbe": _http_probe("/healthz", "metrics", 10, 6),
        "securityContext": _restricted_security_context(),
    }
    resources = _resources(spec.sidecar.resources)
    if resources:
        container["resources"] = resources
    return container


def _restricted_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_spec_scheduling(r: api.RoleSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if r.node_selector:
        out["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        out["tolerations"] = [dict(t) for t in r.tolerations]
    if r.affinity:
        out["affinity"] = dict(r.affinity)
    return out


def _config_hash(spec: api.KVCachePoolSpec) -> str:
    blob = json.dumps(transfer_env(spec), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _deployment(
    pool: PoolRef,
    name: str,
    component: str,
    replicas: int | None,
    pod_spec: dict[str, Any],
    pod_annotations: dict[str, str],
    digest: str,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if replicas is not None:
        spec["replicas"] = replicas
    spec |= {
        "selector": {"matchLabels": role_selector(pool.name, component)},
        "strategy": {"type": "RollingUpdate",
                     "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
        "template": {
            "metadata": {"labels": _labels(pool.name, component), "annotations": pod_annotations},
            "spec": pod_spec,
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(pool, name, component, digest),
        "spec": spec,
    }


def _worker_deployment(
    pool: PoolRef, role: str, spec: api.KVCachePoolSpec, settings: RenderSettings, digest: str
) -> dict[str, Any]:
    r: api.RoleSpec = getattr(spec, role)
    pod_spec = {
        "containers": [
            _vllm_container(pool, role, spec, settings),
            _sidecar_container(pool, role, spec, settings),
        ],
        "volumes": [
            {"name": "kvpool-socket", "emptyDir": {"sizeLimit": "16Mi"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        ],
        "terminationGracePeriodSeconds": 60,
        **_pod_spec_scheduling(r),
    }
    annotations = {CONFIG_HASH_ANNOTATION: _config_hash(spec)}
    replicas = None if r.autoscaled else r.replicas
    return _deployment(pool, f"{pool.name}-{role}", role, replicas, pod_spec, annotations, digest)


def _headless_service(
    pool: PoolRef, role: str, settings: RenderSettings, digest: str
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pool, f"{pool.name}-{role}", role, digest),
        "spec": {
            "clusterIP": "None",
            "selector": role_selector(pool.name, role),
            "ports": [
                {"name": "http", "port": settings.vllm_port, "targetPort": "http",
                 "protocol": "TCP"},
                {"name": "kv", "port": settings.sidecar_port, "targetPort": "kv",
                 "protocol": "TCP"},
            ],
        },
    }


def _service_host(pool: PoolRef, name: str) -> str:
    return f"{name}.{pool.namespace}.svc"


def router_endpoint(pool: PoolRef, spec: api.KVCachePoolSpec, settings: RenderSettings) -> str:
    """The router's OpenAI base URL inside the cluster."""
    host = f"{pool.name}.{pool.namespace}.svc.{settings.cluster_domain}"
    return f"http://{host}:{spec.router.port}/v1"


def _router_deployment(
    pool: PoolRef, spec: api.KVCachePoolSpec, settings: RenderSettings, digest: str
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "router",
        "image": settings.kvpool_image,
        "command": ["kvpool", "router"],
        "args": [
            "--host", "0.0.0.0",
            "--port", str(settings.router_port),
            "--prefill", f"{_service_host(pool, pool.name + '-prefill')}:{settings.vllm_port}",
            "--decode", f"{_service_host(pool, pool.name + '-decode')}:{settings.vllm_port}",
        ],
        "ports": [{"name": "http", "containerPort": settings.router_port, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": config_map_name(pool.name)}}],
        "readinessProbe": _http_probe("/health", "http", 5, 3),
        "livenessProbe": _http_probe("/health", "http", 10, 6),
        "securityContext": _restricted_security_context(),
    }
    resources = _resources(spec.router.resources)
    if resources:
        container["resources"] = resources
    pod_spec = {"containers": [container], "automountServiceAccountToken": False}
    annotations = {CONFIG_HASH_ANNOTATION: _config_hash(spec)}
    return _deployment(pool, f"{pool.name}-router", "router", spec.router.replicas, pod_spec,
                       annotations, digest)


def _router_service(
    pool: PoolRef, spec: api.KVCachePoolSpec, settings: RenderSettings, digest: str
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pool, pool.name, "router", digest),
        "spec": {
            "type": spec.router.service_type,
            "selector": role_selector(pool.name, "router"),
            "ports": [{"name": "http", "port": spec.router.port, "targetPort": "http",
                       "protocol": "TCP"}],
        },
    }


def _pdb(pool: PoolRef, component: str, max_unavailable: int, digest: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(pool, f"{pool.name}-{component}", component, digest),
        "spec": {
            "maxUnavailable": max_unavailable,
            "selector": {"matchLabels": role_selector(pool.name, component)},
        },
    }


def render(
    pool: PoolRef, spec: api.KVCachePoolSpec, settings: RenderSettings
) -> list[dict[str, Any]]:
    """Every child object of ``pool``, in the order they should be applied."""
    digest = inputs_hash(spec, settings)
    objects = [_config_map(pool, spec, digest)]
    for role in api.ROLES:
        objects.append(_headless_service(pool, role, settings, digest))
        objects.append(_worker_deployment(pool, role, spec, settings, digest))
    objects.append(_router_deployment(pool, spec, settings, digest))
    objects.append(_router_service(pool, spec, settings, digest))
    for role in api.ROLES:
        objects.append(_pdb(pool, role, getattr(spec, role).max_unavailable, digest))
    objects.append(_pdb(pool, "router", 1, digest))
    return objects


def key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    """(apiVersion, kind, name): how a child is identified among its siblings."""
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]
