"""Operator settings: one dataclass per concern, each field with its unit, default and reason."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """What the pure rendering of children needs besides the pool itself."""

    kvpool_image: str = "ghcr.io/kvpool/kvpool:0.1.0"
    """Image with the ``kvpool`` command, for the router and (unless the pool names one)
    the sidecars. The chart sets it to the operator's own image (env ``KVPOOL_IMAGE``)."""

    vllm_port: int = 8100
    """Port of vLLM's OpenAI server inside worker pods."""

    sidecar_port: int = 50051
    """gRPC port of the sidecar (KV transfer between pods)."""

    sidecar_metrics_port: int = 9400
    """Prometheus metrics and health port of the sidecar."""

    router_port: int = 8000
    """Container port of the router (the Service's port is ``spec.router.port``)."""

    socket_dir: str = "/run/kvpool"
    """Shared emptyDir where the sidecar listens on a unix socket for the vLLM connector."""

    shm_dir: str = "/run/kvpool-shm"
    """Memory-backed emptyDir mounted into vLLM and the sidecar at this path: decoded
    chunks and put buffers handed over in place (kvpool.sidecar.shm)."""

    shm_size_mib: int = 2048
    """Size limit of that emptyDir (MiB; it counts as the pod's memory). The sidecar holds
    at most 7/8 of it (``--shm-max-mb``), the rest is for the connector's put buffer."""

    cluster_domain: str = "cluster.local"
    """DNS suffix of Services, for the router endpoint written to status."""

    @classmethod
    def from_env(cls) -> RenderSettings:
        return cls(
            kvpool_image=os.environ.get("KVPOOL_IMAGE", cls.kvpool_image),
            cluster_domain=os.environ.get("KVPOOL_CLUSTER_DOMAIN", cls.cluster_domain),
        )


@dataclasses.dataclass(frozen=True)
class ApplySettings:
    """How the operator writes to the API server."""

    field_manager: str = "kvpool-operator"
    """Server-side apply field manager for the children."""

    status_field_manager: str = "kvpool-operator-status"
    """Separate field manager for the pool's status, so that status and children never
    contend for ownership of the same fields."""

    request_timeout_s: float = 30.0
    """Timeout of one API request, in seconds: a hung request fails and kopf retries."""


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    """Everything ``kvpool operator`` runs with."""

    render: RenderSettings = dataclasses.field(default_factory=RenderSettings)
    apply: ApplySettings = dataclasses.field(default_factory=ApplySettings)

    retry_delay_s: float = 5.0
    """Delay before kopf retries a failed reconcile (an API error, a conflict), in seconds."""

    resync_s: float = 300.0
    """Every pool is reconciled at least this often (seconds), even without events: a
    safety net for a missed watch event."""

    transfer_health_interval_s: float = 30.0
    """How often (seconds) the operator reads each pool's sidecars' ``/transfer/health``
    into its ``TransferHealthy`` condition (env ``KVPOOL_TRANSFER_HEALTH_INTERVAL_S``)."""

    transfer_health_timeout_s: float = 2.0
    """How long one sidecar may take to answer (seconds); a silent one counts as
    unreachable. All sidecars of a pool are asked at once."""

    @classmethod
    def from_env(cls) -> OperatorSettings:
        interval = os.environ.get("KVPOOL_TRANSFER_HEALTH_INTERVAL_S")
        return cls(render=RenderSettings.from_env(),
                   transfer_health_interval_s=float(interval) if interval
                   else cls.transfer_health_interval_s)
