"""The sidecar's Prometheus metrics, on a registry of its own (one per sidecar)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class SidecarMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.chunks = Counter(
            "kvpool_sidecar_chunks", "KV chunks handled", ["direction", "level"], registry=r
        )
        self.raw_bytes = Counter(
            "kvpool_sidecar_raw_bytes", "Uncompressed KV bytes handled", ["direction"], registry=r
        )
        self.wire_bytes = Counter(
            "kvpool_sidecar_wire_bytes", "Encoded KV bytes sent or received", ["direction"],
            registry=r,
        )
        self.codec_seconds = Histogram(
            "kvpool_sidecar_chunk_codec_seconds", "Time to encode or decode one chunk",
            ["op"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.chunk_latency = Histogram(
            "kvpool_sidecar_chunk_latency_seconds",
            "From a chunk's arrival in this sidecar to its delivery to the connector",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.transfers = Counter(
            "kvpool_sidecar_transfers", "Transfers finished", ["side", "outcome"], registry=r
        )
        self.failures = Counter(
            "kvpool_sidecar_transfer_failures", "Transfers that could not complete",
            ["side", "reason"], registry=r,
        )
        self.transports = Counter(
            "kvpool_sidecar_transport_transfers", "Transfers by the transport of their payloads",
            ["side", "transport"], registry=r,
        )
        self.transport_fallbacks = Counter(
            "kvpool_sidecar_transport_fallbacks",
            "Transfers over gRPC although this sidecar prefers NIXL (reason: the peer lacks "
            "it, or NIXL is unavailable here)", ["side", "reason"], registry=r,
        )
        self.held = Gauge("kvpool_sidecar_held_transfers", "Transfers held in memory", registry=r)
        self.held_bytes = Gauge(
            "kvpool_sidecar_held_bytes",
            "Bytes of KV held in memory: encoded chunks and shared-memory segments", registry=r)
        self.local_chunks = Counter(
            "kvpool_sidecar_local_chunks",
            "Decoded chunks handed to the connector, by path: shm (a descriptor of shared "
            "memory) or bytes (in the message)", ["path"], registry=r)
        self.expired = Counter(
            "kvpool_sidecar_expired_transfers", "Transfers dropped when their lease ran out",
            registry=r,
        )
