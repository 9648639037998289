"""The pure function from a pool to its desired child objects.

``render(pool, spec, settings)`` returns, in apply order: the transfer ConfigMap, the
headless Service and Deployment of each role (vLLM + kvpool sidecar), the router
Deployment and Service, and a PodDisruptionBudget per Deployment. No I/O, no clock: the
same inputs give the same objects (golden tests pin them), every object carries an
owner reference to the pool and the hash of the inputs it was rendered from.

Contract with the data plane (what the pods run; tests/operator/test_commands.py parses
every command with the real parsers):

- vLLM: ``python -m vllm.entrypoints.openai.api_server`` with ``--kv-transfer-config``
  naming ``KVPoolConnector`` from ``kvpool.sidecar.connector`` (``kv_producer`` on
  prefill, ``kv_consumer`` on decode, the pool's failure policy as
  ``kv_load_failure_policy``) and ``kv_connector_extra_config`` ``{"sidecar":
  "unix://<socket>", "load_timeout_s": ...}``, built by the data plane's own
  :func:`kvpool.sidecar.vllm_args.kv_transfer_config`; on prefill, ``--max-num-batched-tokens``
  is the chunk size (the connector hands the sidecar one chunk per prefill step).
- sidecar: ``kvpool sidecar --local unix://<socket> --peer 0.0.0.0:P --advertise
  $(POD_IP):P --metrics 0.0.0.0:M`` and the transfer flags (``--transport``, ``--level``,
  ``--ttft-target-ms``, ``--transfer-timeout``) as ``$(KVPOOL_*)`` references that the
  kubelet expands from the pool's ConfigMap. The advertised address is what a prefill
  sidecar puts in ``kv_transfer_params`` (``kvpool_peer``): decode pulls the KV from there.
- mutual TLS (``transfer.tls.mode: mTLS``, the default): the sidecar gets ``--tls-dir``
  with the pool's TLS Secret mounted there (``secretName``, or ``<pool>-sidecar-tls`` that
  the operator generates once: :func:`tls_secret`), and its probes move from the gRPC
  peer port (kubelet's gRPC probe speaks plaintext) to ``/transfer/health`` on the
  metrics port.
- codec profile (``transfer.profile``): its volume (a PersistentVolumeClaim or an image,
  ``kvpool-profile``) is mounted read-only into the sidecar of every worker, prefill and
  decode alike, at ``/etc/kvpool/profile``; the sidecar gets ``--profile`` with the file
  there, so both ends of a transfer hold the same profile.
- shared memory: an ``emptyDir`` with ``medium: Memory`` (``kvpool-shm``, size limit
  ``shm_size_mib``) mounted into both containers at ``shm_dir``; the sidecar gets
  ``--shm-dir`` and ``--shm-max-mb`` (7/8 of the limit), the connector ``shm_dir``, and
  chunks cross between them in place (:mod:`kvpool.sidecar.shm`).
- router: ``kvpool router --host 0.0.0.0 --port P --prefill http://HOST:PORT --decode
  http://HOST:PORT`` where the hosts are the roles' headless Services.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from kvpool.operator import api, schema
from kvpool.operator.settings import RenderSettings
from kvpool.sidecar import vllm_args

MANAGED_BY = "kvpool-operator"
POOL_LABEL = "kvpool.dev/pool"
ROLE_LABEL = "kvpool.dev/role"
HASH_ANNOTATION = "kvpool.dev/inputs-hash"
CONFIG_HASH_ANNOTATION = "kvpool.dev/config-hash"

KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}
SOCKET_NAME = "sidecar.sock"
TLS_DIR = "/etc/kvpool/tls"
"""Where the sidecar container finds the pool's TLS Secret."""
PROFILE_DIR = "/etc/kvpool/profile"
"""Where the sidecar container finds the volume that holds the pool's codec profile."""
SIDECAR_UID = 65532
"""The sidecar's non-root user (and the group that may read the TLS Secret's files)."""
PREFILL_MAX_SEQS = 256
"""Prefill's ``--max-num-seqs`` cap: vLLM refuses more sequences than batched tokens (the
chunk size), and its own default reaches 1024 on large GPUs."""


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


def sidecar_address(settings: RenderSettings) -> str:
    """The sidecar's Local service, as the sidecar's ``--local`` and the connector name it."""
    return f"unix://{settings.socket_dir}/{SOCKET_NAME}"


def sidecar_level(transfer: api.TransferSpec) -> str:
    """The sidecar's ``--level``: ``raw`` for the raw codec, ``lossless``, or the level."""
    if transfer.codec == "raw":
        return "raw"
    return "lossless" if transfer.lossless else transfer.level


def tls_secret_name(pool: str, spec: api.KVCachePoolSpec) -> str | None:
    """The Secret the sidecars' certificates come from; None when the pool is plaintext."""
    tls = spec.transfer.tls
    if tls.mode != "mTLS":
        return None
    return tls.secret_name or f"{pool}-sidecar-tls"


def generates_tls_secret(spec: api.KVCachePoolSpec) -> bool:
    """Whether the operator makes the pool's TLS Secret (mTLS and no secretName)."""
    return spec.transfer.tls.mode == "mTLS" and not spec.transfer.tls.secret_name


def tls_secret(pool: PoolRef, data: Mapping[str, bytes]) -> dict[str, Any]:
    """The TLS Secret the operator generates for a pool (``data``:
    :meth:`kvpool.sidecar.tls.TLSBundle.secret_data`), owned by the pool."""
    meta = _metadata(pool, f"{pool.name}-sidecar-tls", "tls", "")
    del meta["annotations"]  # made once, never re-rendered: no inputs hash
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "kubernetes.io/tls",
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())},
    }


def profile_volume(spec: api.KVCachePoolSpec) -> dict[str, Any] | None:
    """The volume the pool's codec profile comes from (``kvpool-profile``); None without one.
    The API's sources have the fields of core/v1's, under the same names."""
    profile = spec.transfer.profile
    if profile is None:
        return None
    if profile.persistent_volume_claim is not None:
        return {"name": "kvpool-profile",
                "persistentVolumeClaim": schema.dump(profile.persistent_volume_claim)}
    return {"name": "kvpool-profile", "image": schema.dump(profile.image)}


def profile_file(spec: api.KVCachePoolSpec) -> str | None:
    """The sidecars' ``--profile``: the file in the volume, where the sidecar mounts it."""
    profile = spec.transfer.profile
    return None if profile is None else f"{PROFILE_DIR}/{profile.path}"


def _seconds(ms: int) -> str:
    return f"{ms / 1000:g}"


def transfer_env(spec: api.KVCachePoolSpec) -> dict[str, str]:
    """The sidecars' transfer settings (the ConfigMap), referenced by their flags."""
    t = spec.transfer
    return {
        "KVPOOL_TRANSPORT": t.transport,
        "KVPOOL_LEVEL": sidecar_level(t),
        "KVPOOL_TTFT_TARGET_MS": str(t.ttft_target_ms),
        "KVPOOL_TRANSFER_TIMEOUT_S": _seconds(t.timeout_ms),
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


def _grpc_probe(port: int, period: int, failures: int) -> dict[str, Any]:
    return {"grpc": {"port": port}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures}


def _kv_transfer_config(role: str, spec: api.KVCachePoolSpec, settings: RenderSettings) -> str:
    config = vllm_args.kv_transfer_config(
        sidecar_address(settings),
        role=KV_ROLES[role],
        failure_policy=spec.transfer.failure_policy,
        load_timeout_s=spec.transfer.timeout_ms / 1000,
        shm_dir=settings.shm_dir,
    )
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
        "--kv-transfer-config", _kv_transfer_config(role, spec, settings),
    ]
    if role == "prefill":
        chunk = spec.transfer.chunk_tokens
        args += ["--max-num-batched-tokens", str(chunk),
                 "--max-num-seqs", str(min(chunk, PREFILL_MAX_SEQS))]
    if r.gpus > 1:
        args += ["--tensor-parallel-size", str(r.gpus)]
    args += r.vllm_args
    container: dict[str, Any] = {
        "name": "vllm",
        "image": spec.image,
        "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "args": args,
        "ports": [{"name": "http", "containerPort": settings.vllm_port, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "kvpool-socket", "mountPath": settings.socket_dir},
            {"name": "kvpool-shm", "mountPath": settings.shm_dir},
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
    tls = tls_secret_name(pool.name, spec) is not None
    profile = profile_file(spec)
    mounts: list[dict[str, Any]] = [{"name": "kvpool-socket", "mountPath": settings.socket_dir},
                                    {"name": "kvpool-shm", "mountPath": settings.shm_dir}]
    if profile is not None:
        mounts.append({"name": "kvpool-profile", "mountPath": PROFILE_DIR, "readOnly": True})
    if tls:
        mounts.append({"name": "kvpool-tls", "mountPath": TLS_DIR, "readOnly": True})
        # kubelet's gRPC probe speaks plaintext: the metrics port answers once the sidecar
        # serves (it starts after both gRPC servers).
        ready = _http_probe("/transfer/health", "metrics", 5, 3)
        alive = _http_probe("/transfer/health", "metrics", 10, 6)
    else:
        # The standard gRPC health service, served by the sidecar on its peer port.
        ready = _grpc_probe(settings.sidecar_port, 5, 3)
        alive = _grpc_probe(settings.sidecar_port, 10, 6)
    container: dict[str, Any] = {
        "name": "sidecar",
        "image": spec.sidecar.image or settings.kvpool_image,
        "command": ["kvpool", "sidecar"],
        "args": [
            "--local", sidecar_address(settings),
            "--peer", f"0.0.0.0:{settings.sidecar_port}",
            "--advertise", f"$(POD_IP):{settings.sidecar_port}",
            "--metrics", f"0.0.0.0:{settings.sidecar_metrics_port}",
            "--transport", "$(KVPOOL_TRANSPORT)",
            "--level", "$(KVPOOL_LEVEL)",
            "--ttft-target-ms", "$(KVPOOL_TTFT_TARGET_MS)",
            "--transfer-timeout", "$(KVPOOL_TRANSFER_TIMEOUT_S)",
            "--shm-dir", settings.shm_dir,
            "--shm-max-mb", str(settings.shm_size_mib * 7 // 8),
            *(["--tls-dir", TLS_DIR] if tls else []),
            # $$: the kubelet would expand a $(VAR) in the file's name
            *(["--profile", profile.replace("$", "$$")] if profile is not None else []),
        ],
        "ports": [
            {"name": "kv", "containerPort": settings.sidecar_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": settings.sidecar_metrics_port, "protocol": "TCP"},
        ],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "envFrom": [{"configMapRef": {"name": config_map_name(pool.name)}}],
        "volumeMounts": mounts,
        "readinessProbe": ready,
        "livenessProbe": alive,
        "securityContext": _restricted_security_context(),
    }
    resources = _resources(spec.sidecar.resources)
    if resources:
        container["resources"] = resources
    return container


def _restricted_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": SIDECAR_UID,
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
    template_metadata: dict[str, Any] = {"labels": _labels(pool.name, component)}
    if pod_annotations:
        template_metadata["annotations"] = pod_annotations
    spec |= {
        "selector": {"matchLabels": role_selector(pool.name, component)},
        "strategy": {"type": "RollingUpdate",
                     "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
        "template": {"metadata": template_metadata, "spec": pod_spec},
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
    volumes: list[dict[str, Any]] = [
        {"name": "kvpool-socket", "emptyDir": {"sizeLimit": "16Mi"}},
        {"name": "kvpool-shm",
         "emptyDir": {"medium": "Memory", "sizeLimit": f"{settings.shm_size_mib}Mi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
    ]
    secret = tls_secret_name(pool.name, spec)
    if secret is not None:
        # Readable by the sidecar's group only (fsGroup), not by everyone in the pod.
        volumes.append({"name": "kvpool-tls",
                        "secret": {"secretName": secret, "defaultMode": 0o440}})
    profile = profile_volume(spec)
    if profile is not None:
        volumes.append(profile)
    pod_spec: dict[str, Any] = {
        "containers": [
            _vllm_container(pool, role, spec, settings),
            _sidecar_container(pool, role, spec, settings),
        ],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 60,
        **_pod_spec_scheduling(r),
    }
    if secret is not None:
        pod_spec["securityContext"] = {"fsGroup": SIDECAR_UID}
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


def _worker_url(pool: PoolRef, role: str, settings: RenderSettings) -> str:
    """A role's vLLM base URL for the router: its headless Service."""
    return f"http://{pool.name}-{role}.{pool.namespace}.svc:{settings.vllm_port}"


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
            "--prefill", _worker_url(pool, "prefill", settings),
            "--decode", _worker_url(pool, "decode", settings),
        ],
        "ports": [{"name": "http", "containerPort": settings.router_port, "protocol": "TCP"}],
        # /health fails while a role has no worker up: not ready, but alive (/metrics).
        "readinessProbe": _http_probe("/health", "http", 5, 3),
        "livenessProbe": _http_probe("/metrics", "http", 10, 6),
        "securityContext": _restricted_security_context(),
    }
    resources = _resources(spec.router.resources)
    if resources:
        container["resources"] = resources
    pod_spec = {"containers": [container], "automountServiceAccountToken": False}
    # No config hash: the router reads no transfer setting.
    return _deployment(pool, f"{pool.name}-router", "router", spec.router.replicas, pod_spec,
                       {}, digest)


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
