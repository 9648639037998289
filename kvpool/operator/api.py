"""The ``KVCachePool`` API, version ``kvpool.dev/v1alpha1``: its one annotated definition.

Everything else is generated from the dataclasses below: the CRD's structural schema
with defaults, enums, bounds and CEL rules (:mod:`kvpool.operator.crd`), and the typed,
defaulted spec the operator renders children from (:func:`load_spec`).

Scaling. A CRD has one ``scale`` subresource; here it drives the **decode** role
(``spec.decode.replicas``, selector in ``status.decode.selector``), the role that grows with
the number of concurrent generations: ``kubectl scale kvp/NAME --replicas N`` and an HPA
whose ``scaleTargetRef`` is the KVCachePool both scale decode. Any role (prefill, decode)
can instead set ``autoscaled: true``: the operator then leaves ``spec.replicas`` out of
what it applies to that role's Deployment (``<pool>-prefill`` / ``<pool>-decode``), so
with server-side apply the HPA that targets that Deployment owns the replica count and the
operator never fights it. ``docs/operator.md`` shows both HPAs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from kvpool.operator import schema
from kvpool.operator.schema import Embedded, Int64, Quantity, Rule, field

GROUP = "kvpool.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "KVCachePool"
PLURAL = "kvcachepools"
SINGULAR = "kvcachepool"
SHORT_NAMES = ("kvp",)
CATEGORIES = ("kvpool",)

MAX_NAME_LENGTH = 46
"""A pool's name is at most this long, leaving room for the suffixes of its children's
names (``-prefill``, then the ReplicaSet and Pod hashes) within a DNS label (63)."""

ROLES = ("prefill", "decode")
"""The worker roles, in the order they are rendered and reported."""

TransportName = Literal["grpc", "nixl"]
CodecName = Literal["cachegen", "raw"]
LevelName = Literal["adaptive", "high", "default", "low", "lowest"]
FailurePolicy = Literal["recompute", "fail"]
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]
ConditionStatus = Literal["True", "False", "Unknown"]
TLSMode = Literal["mTLS", "plaintext"]
PullPolicy = Literal["Always", "IfNotPresent", "Never"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model both roles serve."""

    name: str = field(
        "Model to load: a Hugging Face repo id or a path inside the worker image "
        "(vLLM --model).",
        max_length=253,
        pattern=r"^\S+$",
    )
    served_name: str | None = field(
        "Name clients use in the OpenAI API (vLLM --served-model-name); default: name.",
        max_length=253,
        default=None,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Resources:
    """CPU and memory for a container (GPUs are asked for with the role's gpus field)."""

    requests: dict[str, Quantity] = field(
        "Minimum resources, e.g. {cpu: 4, memory: 16Gi}.", default={}, max_properties=16
    )
    limits: dict[str, Quantity] = field(
        "Maximum resources, e.g. {memory: 32Gi}.", default={}, max_properties=16
    )

    __cel__ = (
        Rule(
            "!('nvidia.com/gpu' in self.requests) && !('nvidia.com/gpu' in self.limits)",
            "GPUs are set with the role's gpus field, not in resources",
        ),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoleSpec:
    """One worker role (prefill or decode): a Deployment of vLLM + kvpool sidecar pods."""

    replicas: int = field("Number of worker pods.", default=1, minimum=0, maximum=1000)
    autoscaled: bool = field(
        "When true the operator does not set the Deployment's replicas, so that an HPA "
        "targeting the role's Deployment owns them.",
        default=False,
    )
    gpus: int = field(
        "nvidia.com/gpu per worker pod (vLLM --tensor-parallel-size); 0 runs on CPU.",
        default=1,
        minimum=0,
        maximum=16,
    )
    resources: Resources = field("CPU and memory of the vLLM container.", default=Resources())
    vllm_args: list[str] = field(
        "Extra vLLM arguments, appended after the ones the operator sets.",
        default=[],
        max_items=64,
        name="vllmArgs",
    )
    node_selector: dict[str, str] = field(
        "Node labels the worker pods must match.", default={}, max_properties=32
    )
    tolerations: list[Embedded] = field(
        "Pod tolerations (core/v1 Toleration).", default=[], max_items=32
    )
    affinity: Embedded | None = field("Pod affinity (core/v1 Affinity).", default=None)
    max_unavailable: int = field(
        "Pods of this role a voluntary disruption may take down at once (PodDisruptionBudget).",
        default=1,
        minimum=0,
        maximum=1000,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TLSSpec:
    """How the sidecars of a pool secure their peer API (the KV path between pods)."""

    mode: TLSMode = field(
        "mTLS: sidecars authenticate each other with certificates from secretName (or from "
        "a Secret the operator generates); plaintext: no encryption, no authentication.",
        default="mTLS",
    )
    secret_name: str | None = field(
        "Secret with ca.crt, tls.crt and tls.key (tls.crt signed by ca.crt, valid for the "
        "name kvpool-sidecar). Default: <pool>-sidecar-tls, a self-signed CA and "
        "certificate the operator generates once and owns.",
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        default=None,
    )

    __cel__ = (
        Rule(
            "self.mode == 'mTLS' || !has(self.secretName)",
            "secretName applies to mode mTLS only",
            ".secretName",
        ),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClaimSource:
    """A PersistentVolumeClaim that holds the profile file (ReadOnlyMany, or ReadWriteMany,
    when the pool's pods run on several nodes)."""

    claim_name: str = field(
        "Name of the PersistentVolumeClaim, in the pool's namespace.",
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
    )
    read_only: bool = field(
        "Attach the volume read-only (the sidecars only read the profile; the mount is "
        "read-only either way).",
        default=True,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageSource:
    """An OCI image (or artifact) whose files hold the profile, mounted as an image volume
    (Kubernetes 1.31+ with the ImageVolume feature, and a container runtime that has it)."""

    reference: str = field(
        "Image reference, e.g. registry.example/profiles/llama-3.1-8b:v1.",
        max_length=512,
        pattern=r"^\S+$",
    )
    pull_policy: PullPolicy | None = field(
        "Always, IfNotPresent or Never; default: Always for :latest, else IfNotPresent.",
        default=None,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfileSpec:
    """The model's codec profile (``kvpool profile``) that the sidecars of both roles code
    lossy chunks with: one volume, mounted read-only into every sidecar, so that prefill and
    decode hold the same file."""

    persistent_volume_claim: ClaimSource | None = field(
        "The profile is on this PersistentVolumeClaim.", default=None
    )
    image: ImageSource | None = field("The profile is in this image.", default=None)
    path: str = field(
        "The profile file, relative to the volume's root, e.g. llama-3.1-8b.kvprofile.",
        max_length=1024,
    )

    __cel__ = (
        Rule(
            "has(self.persistentVolumeClaim) != has(self.image)",
            "profile needs exactly one source: persistentVolumeClaim or image",
        ),
        Rule(
            "self.path != '' && !self.path.endsWith('/')",
            "path names a file inside the volume",
            ".path",
        ),
        Rule(
            "!self.path.startsWith('/')",
            "path is relative to the volume's root: no leading /",
            ".path",
        ),
        Rule(
            "!self.path.matches('(^|/)[.][.](/|$)')",
            "path must stay inside the volume: no .. segment",
            ".path",
        ),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransferSpec:
    """How the KV cache moves from prefill to decode."""

    transport: TransportName = field(
        "grpc: sidecar-to-sidecar gRPC streams; nixl: prefer NIXL/UCX (needs GPUs), used by "
        "each pair of sidecars that both have it, gRPC otherwise.",
        default="grpc",
    )
    codec: CodecName = field(
        "cachegen: CacheGen-style compression; raw: the KV bytes as vLLM holds them.",
        default="cachegen",
    )
    level: LevelName = field(
        "CacheGen level: adaptive (picked per chunk from the measured throughput so that the "
        "KV arrives within ttftTargetMs), or a fixed one from high (most precise) to lowest.",
        default="adaptive",
    )
    lossless: bool = field(
        "Encode without quantization (bit-exact KV; overrides level); cachegen only.", default=False
    )
    block_size: int = field(
        "vLLM KV block size in tokens (--block-size), the same for both roles.",
        default=16,
        minimum=1,
        maximum=256,
    )
    chunk_tokens: int = field(
        "Tokens per transferred chunk (prefill's vLLM step: --max-num-batched-tokens); a "
        "multiple of blockSize.",
        default=256,
        minimum=16,
        maximum=8192,
    )
    failure_policy: FailurePolicy = field(
        "When KV cannot arrive: recompute the prefill on decode, or fail the request.",
        default="recompute",
    )
    timeout_ms: int = field(
        "How long decode waits for a transfer's KV before applying failurePolicy.",
        default=5000,
        minimum=10,
        maximum=600000,
    )
    ttft_target_ms: int = field(
        "With level adaptive: milliseconds from a transfer's first chunk by which all of its "
        "KV should be in decode.",
        default=2000,
        minimum=10,
        maximum=600000,
    )
    tls: TLSSpec = field("Security of the sidecars' peer API.", default=TLSSpec())
    profile: ProfileSpec | None = field(
        "The model's codec profile (kvpool profile): lossy chunks then carry no tables and "
        "code smaller; every sidecar of the pool gets the same file. cachegen codec, lossy "
        "levels only.",
        default=None,
    )

    __cel__ = (
        Rule(
            "self.chunkTokens % self.blockSize == 0",
            "chunkTokens must be a multiple of blockSize",
            ".chunkTokens",
        ),
        Rule(
            "self.codec == 'cachegen' || (self.level == 'adaptive' && !self.lossless)",
            "level and lossless apply to the cachegen codec only",
            ".codec",
        ),
        Rule(
            "!has(self.profile) || (self.codec == 'cachegen' && !self.lossless)",
            "profile applies to the lossy levels of the cachegen codec only (not raw, not "
            "lossless)",
            ".profile",
        ),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterSpec:
    """The OpenAI-compatible router in front of the pool."""

    replicas: int = field("Router pods.", default=1, minimum=1, maximum=100)
    service_type: ServiceType = field("Type of the router Service.", default="ClusterIP")
    port: int = field("Port of the router Service.", default=8000, minimum=1, maximum=65535)
    resources: Resources = field(
        "Router container resources.",
        default=Resources(requests={"cpu": "250m", "memory": "256Mi"}),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SidecarSpec:
    """The kvpool sidecar beside each vLLM worker (encodes, sends, receives, decodes KV)."""

    image: str | None = field(
        "Image with the kvpool command; default: the operator's own image.",
        max_length=512,
        default=None,
    )
    resources: Resources = field(
        "Sidecar container resources.",
        default=Resources(requests={"cpu": "500m", "memory": "1Gi"}),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCachePoolSpec:
    """Desired state of a pool of prefill and decode vLLM workers sharing compressed KV."""

    model: ModelSpec = field("The model served.")
    image: str = field(
        "Worker image: vLLM with the kvpool package installed.", max_length=512, pattern=r"^\S+$"
    )
    prefill: RoleSpec = field("Prefill workers.", default=RoleSpec())
    decode: RoleSpec = field("Decode workers.", default=RoleSpec())
    transfer: TransferSpec = field("KV transfer settings.", default=TransferSpec())
    router: RouterSpec = field("Router settings.", default=RouterSpec())
    sidecar: SidecarSpec = field("Sidecar settings.", default=SidecarSpec())

    __cel__ = (
        Rule("self.decode.replicas >= 1", "decode.replicas must be at least 1", ".decode.replicas"),
        Rule(
            "self.transfer.transport != 'nixl' || (self.prefill.gpus >= 1 && self.decode.gpus >= 1)",
            "transport nixl needs a GPU in both roles (prefill.gpus and decode.gpus >= 1)",
            ".transfer.transport",
        ),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoleStatus:
    """Observed state of one role."""

    desired: int = field("Replicas wanted.", default=0, minimum=0)
    replicas: int = field("Pods that exist (scale subresource status).", default=0, minimum=0)
    ready: int = field("Pods ready.", default=0, minimum=0)
    readiness: str = field("ready/desired, for kubectl.", default="0/0")
    selector: str | None = field(
        "Label selector of the role's pods (for the scale subresource).", default=None
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Condition:
    """A metav1.Condition."""

    type: str = field("Ready, Progressing, Degraded or TransferHealthy.", max_length=316)
    status: ConditionStatus = field("True, False or Unknown.")
    reason: str = field("CamelCase reason.", max_length=1024)
    message: str = field("Human-readable details.", default="", max_length=32768)
    last_transition_time: str = field("When status last changed (RFC 3339).")
    observed_generation: int | None = field(
        "metadata.generation this condition is about.", default=None
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransferStatus:
    """The pool's KV transfers over the sidecars' recent window, summed over the sidecars
    that answered (read by the operator from each sidecar's /transfer/health)."""

    bytes_saved: Int64 = field("Bytes compression kept off the wire (raw - wire).", default=0)
    raw_bytes: Int64 = field("Uncompressed KV bytes delivered.", default=0, minimum=0)
    wire_bytes: Int64 = field("Bytes of that KV on the wire.", default=0, minimum=0)
    transfers: int = field("Transfers finished (delivered, failed or recomputed).", default=0,
                           minimum=0)
    failed: int = field("Transfers that failed (decode recomputed).", default=0, minimum=0)
    recomputed: int = field("Requests that fell back to recompute (failures included).",
                            default=0, minimum=0)
    window_seconds: int = field("The window these counts cover, in seconds.", default=0,
                                minimum=0)
    sidecars: str = field("Sidecars that answered / worker pods running.", default="0/0")
    failure_reasons: dict[str, int] = field(
        "Failed transfers by reason (peer, timeout, checksum, codec, profile_mismatch, "
        "peer_restarted, ...).",
        default={})
    transports: dict[str, int] = field("Transfers by the transport they crossed on (grpc, nixl).",
                                       default={})
    transport_fallbacks: int = field(
        "Transfers that took gRPC where NIXL was preferred (a peer without NIXL).", default=0,
        minimum=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCachePoolStatus:
    """Observed state, written by the operator."""

    observed_generation: int | None = field(
        "The spec generation this status describes.", default=None
    )
    prefill: RoleStatus | None = field("Prefill role.", default=None)
    decode: RoleStatus | None = field("Decode role.", default=None)
    router: RoleStatus | None = field("Router.", default=None)
    router_endpoint: str | None = field(
        "URL of the router's OpenAI API inside the cluster.", default=None
    )
    inputs_hash: str | None = field(
        "Hash of everything the children were rendered from.", default=None
    )
    transfer: TransferStatus | None = field(
        "KV transfers of the recent window (TransferHealthy says what they mean).", default=None
    )
    conditions: list[Condition] = field(
        "Ready, Progressing, Degraded, TransferHealthy.",
        default=[],
        extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


def load_spec(raw: Any) -> KVCachePoolSpec:
    """The typed, defaulted spec of a pool (raises :class:`schema.SpecError` when malformed)."""
    return schema.load(KVCachePoolSpec, raw, "spec")
