"""kvpool's vLLM v1 KV connector: hands prompt KV to the local sidecar and takes it back.

The connector is thin: compression and transport belong to the sidecar
(``kvpool sidecar``, reached over a unix socket). vLLM loads it with::

    --kv-transfer-config '{"kv_connector": "KVPoolConnector",
        "kv_connector_module_path": "kvpool.sidecar.connector",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"sidecar": "unix:///run/kvpool/sidecar.sock"}}'

(:func:`kvpool.sidecar.vllm_args.kv_transfer_config` builds it; that module also shows
the full engine and sidecar command lines). ``kv_role`` ``kv_both`` serves both roles
(``kv_producer`` for prefill only, ``kv_consumer`` for decode only);
``kv_load_failure_policy: "recompute"`` makes decode
recompute a prompt whose KV cannot arrive instead of failing the request. Extra config:
``sidecar`` (required; or ``$KVPOOL_SIDECAR``), ``level`` (default level of this
prefill worker's chunks, else the sidecar's), ``model`` (name hashed into chunk names;
default: the served model name), ``load_timeout_s`` (30), ``shm_dir`` (or
``$KVPOOL_SHM_DIR``: this process's path to the directory it shares with the sidecar;
default: the path the sidecar announces; ``off``: never map shared memory).

The request flow (the router does steps 1 and 3, as vLLM's P/D proxy does):

1. Prefill request with ``kv_transfer_params = {"do_remote_decode": true}`` (optional
   ``"kvpool_push_to": <decode sidecar peer address>`` to stream the KV there while the
   prompt is computed; ``"kvpool_level"`` to pick the level of this request's chunks).
2. As prefill computes each layer, ``save_kv_layer`` copies that layer's new prompt
   tokens out of the paged cache and hands them to the sidecar, which encodes them (and
   pushes them on) at once. ``request_finished`` returns ``kv_transfer_params`` naming
   the transfer: ``{"do_remote_prefill": true, "kvpool_transfer": ..., "kvpool_peer":
   ..., "kvpool_instance": ..., ...}`` (``kvpool_instance``: the sidecar process holding
   it; another process at that address, a restarted sidecar, refuses the transfer).
3. Decode request with those ``kv_transfer_params``: ``get_num_new_matched_tokens``
   reports the prompt as external tokens loaded asynchronously; the worker streams the
   decoded chunks from its sidecar into the allocated blocks, then reports the request
   finished receiving, or failed (``failed_recving``) so that vLLM recomputes it. When the
   worker sees the sidecar's shared-memory directory (it reads the probe file ``Info``
   names), chunks come as descriptors of regions there, which it maps and scatters from
   (:mod:`kvpool.sidecar.shm`), and it calls ``Release`` once done; otherwise as bytes.

Scheduler-side (:class:`KVPoolScheduler`): get_num_new_matched_tokens,
update_state_after_alloc, build_connector_meta, request_finished.
Worker-side (:class:`KVPoolWorker`): register_kv_caches, start_load_kv, save_kv_layer,
wait_for_save, get_transfer_results. Metadata crossing between them:
:class:`KVPoolConnectorMetadata`. Only the first KV cache group is transferred (models
with one attention type).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.model_executor.models.utils import extract_layer_index

from kvpool.sidecar import chunks, shm
from kvpool.sidecar.client import SidecarClient
from kvpool.sidecar.proto import sidecar_pb2 as pb

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Under "vllm." so that the records share vLLM's log handlers and format.
log = logging.getLogger("vllm.kvpool.connector")


@dataclass
class SaveSpec:
    """Prefill: save prompt tokens [start, end) of one request in this step."""

    transfer_id: str
    block_ids: list[int]
    start: int
    end: int
    prefix_hash: bytes
    """prefix_hash(model, prompt, end): the name of the chunks saved."""
    num_prompt_tokens: int
    level: str
    push_to: str
    abort: bool = False
    """The request was preempted: its transfer is marked failed instead."""

    @property
    def last(self) -> bool:
        return self.abort or self.end >= self.num_prompt_tokens


@dataclass
class LoadSpec:
    """Decode: load prompt tokens [first_token, len(token_ids)) of one request."""

    request_id: str
    transfer_id: str
    peer: str
    expect_push: bool
    block_ids: list[int]
    first_token: int
    token_ids: list[int]
    peer_instance: str = ""
    """The prefill sidecar instance that holds the transfer (empty: not checked)."""


@dataclass
class KVPoolConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)


@dataclass
class ConnectorConfig:
    sidecar: str
    model: str
    level: str
    block_size: int
    load_timeout_s: float
    shm_dir: str = ""
    """This process's path to the directory shared with the sidecar ("": the sidecar's own
    path; "off": bytes only)."""

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> ConnectorConfig:
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        sidecar = extra.get("sidecar") or os.environ.get("KVPOOL_SIDECAR")
        if not sidecar:
            raise ValueError(
                "KVPoolConnector needs the local sidecar's address: "
                'kv_connector_extra_config {"sidecar": "unix:///path/sidecar.sock"} '
                "or $KVPOOL_SIDECAR"
            )
        model = extra.get("model") or vllm_config.model_config.served_model_name
        return cls(
            sidecar=sidecar,
            model=str(model),
            level=str(extra.get("level", "")),
            block_size=vllm_config.cache_config.block_size,
            load_timeout_s=float(extra.get("load_timeout_s", 30.0)),
            shm_dir=str(extra.get("shm_dir", os.environ.get(shm.ENV_DIR, ""))),
        )


# ---- scheduler side ----------------------------------------------------------------------


@dataclass
class _Saving:
    request: Request
    transfer_id: str
    block_ids: list[int]
    level: str
    push_to: str


class KVPoolScheduler:
    """Decides which prompt tokens are saved or loaded each step (scheduler process)."""

    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        self._saving: dict[str, _Saving] = {}
        self._loads: list[LoadSpec] = []
        self._client: SidecarClient | None = None
        self._info: pb.InfoReply | None = None
        self._connection = 0  # bumped whenever the channel to the sidecar leaves READY

    @staticmethod
    def _wants_load(request: Request) -> bool:
        params = request.kv_transfer_params
        return bool(params and params.get("do_remote_prefill") and params.get("kvpool_transfer"))

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        if not self._wants_load(request):
            return 0, False
        count = len(request.prompt_token_ids or ()) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params or {}
        if self._wants_load(request):
            params["do_remote_prefill"] = False  # one load per request
            if num_external_tokens > 0:
                prompt = list(request.prompt_token_ids or ())
                self._loads.append(LoadSpec(
                    request_id=request.request_id,
                    transfer_id=params["kvpool_transfer"],
                    peer=str(params.get("kvpool_peer", "")),
                    expect_push=bool(params.get("kvpool_push")),
                    block_ids=list(blocks.get_block_ids()[0]),
                    first_token=len(prompt) - num_external_tokens,
                    token_ids=prompt,
                    peer_instance=str(params.get("kvpool_instance", "")),
                ))
        elif params.get("do_remote_decode") and request.request_id not in self._saving:
            self._saving[request.request_id] = _Saving(
                request=request,
                transfer_id=uuid.uuid4().hex,
                block_ids=list(blocks.get_block_ids()[0]),
                level=str(params.get("kvpool_level", self.config.level)),
                push_to=str(params.get("kvpool_push_to", "")),
            )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVPoolConnectorMetadata:
        meta = KVPoolConnectorMetadata(loads=self._loads)
        self._loads = []
        new = {r.req_id: r for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            saving = self._saving.get(req_id)
            if saving is None:
                continue
            if req_id in cached.resumed_req_ids:
                # Preempted and recomputed: what was sent may not match. Give up on it.
                meta.saves.append(self._spec(saving, 0, 0, abort=True))
                del self._saving[req_id]
                continue
            if cached.new_block_ids[i] is not None:
                saving.block_ids.extend(cached.new_block_ids[i][0])
            self._add_save(meta, saving, cached.num_computed_tokens[i],
                           scheduler_output.num_scheduled_tokens[req_id])
        for req_id, data in new.items():
            saving = self._saving.get(req_id)
            if saving is not None:
                saving.block_ids = list(data.block_ids[0])
                # Tokens found in the local prefix cache are saved too: start at 0.
                self._add_save(meta, saving, 0,
                               data.num_computed_tokens + scheduler_output.num_scheduled_tokens[req_id])
        return meta

    def _spec(self, saving: _Saving, start: int, end: int, abort: bool = False) -> SaveSpec:
        prompt = saving.request.prompt_token_ids or []
        return SaveSpec(
            transfer_id=saving.transfer_id,
            block_ids=list(saving.block_ids),
            start=start,
            end=end,
            prefix_hash=chunks.prefix_hash(self.config.model, prompt, end),
            num_prompt_tokens=len(prompt),
            level=saving.level,
            push_to=saving.push_to,
            abort=abort,
        )

    def _add_save(self, meta: KVPoolConnectorMetadata, saving: _Saving, start: int,
                  num_tokens: int) -> None:
        num_prompt = len(saving.request.prompt_token_ids or ())
        end = min(start + num_tokens, num_prompt)
        if start < end:
            meta.saves.append(self._spec(saving, start, end))

    def _connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state != grpc.ChannelConnectivity.READY:
            self._connection += 1
            self._info = None

    def sidecar_info(self) -> tuple[str, str]:
        """The local sidecar's peer address and instance; empty while it cannot be reached.
        Asked again whenever the connection to the sidecar was lost (a restarted sidecar
        is another instance), not for each request."""
        if self._client is None:
            self._client = SidecarClient(self.config.sidecar, timeout_s=5.0)
            self._client.watch(self._connectivity)
        info = self._info
        if info is None:
            connection = self._connection
            try:
                info = self._client.info()
            except grpc.RpcError as exc:
                log.warning("sidecar %s unreachable: %s", self.config.sidecar, exc.details())
                return "", ""
            if connection == self._connection:  # still the connection it was asked over
                self._info = info
        return info.peer, info.instance

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        saving = self._saving.pop(request.request_id, None)
        if saving is None:
            return False, None
        # The KV was copied out as it was computed: the blocks can be freed now.
        peer, instance = self.sidecar_info()
        return False, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "kvpool_transfer": saving.transfer_id,
            "kvpool_peer": peer,
            "kvpool_instance": instance,
            "kvpool_push": bool(saving.push_to),
            "kvpool_model": self.config.model,
            "kvpool_tokens": len(request.prompt_token_ids or ()),
        }


# ---- worker side -------------------------------------------------------------------------


class LoadError(RuntimeError):
    """A transfer's chunks do not fill the request's prompt."""


class KVPoolWorker:
    """Copies KV between vLLM's paged cache and the sidecar (worker process)."""

    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        self.client = SidecarClient(config.sidecar, timeout_s=config.load_timeout_s)
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.layer_names: list[str] = []
        self.layer_of: dict[str, int] = {}
        self._outbox: queue.Queue[tuple | None] = queue.Queue()
        self._broken: set[str] = set()
        self._sender = threading.Thread(target=self._send_forever, name="kvpool-save", daemon=True)
        self._sender.start()
        self._lock = threading.Lock()
        self._finished: set[str] = set()
        self._failed: set[str] = set()
        self._slots: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._shm_lock = threading.Lock()
        self._shm_dir: Path | None = None
        self._shm_known = config.shm_dir.strip().lower() in shm.OFF[1:]  # off: never asked
        self._put_buf: shm.PutBuffer | None = None
        self._put_off = False
        self.stats = {"loaded": 0, "load_failures": 0, "saved_chunks": 0, "save_failures": 0}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches
        self.layer_names = sorted(kv_caches, key=extract_layer_index)
        self.layer_of = {name: i for i, name in enumerate(self.layer_names)}

    # -- prefill: save

    def save_kv_layer(self, meta: KVPoolConnectorMetadata, layer_name: str,
                      kv_layer: torch.Tensor) -> None:
        layer = self.layer_of.get(layer_name)
        if layer is None or not meta.saves:
            return
        layout = chunks.layout_for(kv_layer)
        for spec in meta.saves:
            if spec.abort:
                continue
            slots = self._slots.get(spec.transfer_id)
            if slots is None:
                slots = chunks.token_slots(spec.block_ids, self.config.block_size,
                                           spec.start, spec.end)
                self._slots[spec.transfer_id] = slots
            k, v = layout.gather(kv_layer, *slots)
            self._outbox.put(("put", spec, layer, k, v))

    def wait_for_save(self, meta: KVPoolConnectorMetadata) -> None:
        self._slots.clear()
        for spec in meta.saves:
            if spec.last:
                self._outbox.put(("seal", spec, len(self.layer_names)))

    def _send_forever(self) -> None:
        while (item := self._outbox.get()) is not None:
            spec: SaveSpec = item[1]
            try:
                if item[0] == "put":
                    self._put(spec, *item[2:])
                else:
                    self._seal(spec, item[2])
            except grpc.RpcError as exc:
                self.stats["save_failures"] += 1
                if spec.transfer_id not in self._broken:
                    log.warning("kvpool: transfer %s: sidecar %s: %s", spec.transfer_id,
                                self.config.sidecar, exc.details())
                self._broken.add(spec.transfer_id)

    def _put(self, spec: SaveSpec, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if spec.transfer_id in self._broken:
            return
        key = pb.ChunkKey(layer=layer, token_start=spec.start, token_end=spec.end,
                          prefix_hash=spec.prefix_hash)
        request = pb.PutRequest(
            transfer_id=spec.transfer_id, model=self.config.model, level=spec.level,
            push_to=spec.push_to, num_layers=len(self.layer_names))
        if not self._put_shared(request, key, k, v):
            request.chunk.CopyFrom(pb.RawChunk(
                key=key, dtype=chunks.dtype_name(k.dtype), width=k.shape[1],
                keys=chunks.to_bytes(k), values=chunks.to_bytes(v)))
            self.client.put(request)
        self.stats["saved_chunks"] += 1

    def _put_shared(self, request: pb.PutRequest, key: pb.ChunkKey, k: torch.Tensor,
                    v: torch.Tensor) -> bool:
        """Put a chunk through the put buffer in shared memory; False when it must go as
        bytes (no shared memory, no room, or the sidecar cannot read the buffer, in which
        case the buffer is given up for good)."""
        buffer = self._put_buffer()
        if buffer is None:
            return False
        try:
            request.shared.CopyFrom(buffer.write(key, k, v))
        except shm.ShmFull:
            return False
        try:
            self.client.put(request)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning("kvpool: sidecar %s cannot read the put buffer (%s): chunks go as "
                        "bytes", self.config.sidecar, exc.details())
            self._put_off = True
            self._put_buf = None
            buffer.close()
            request.ClearField("shared")
            return False
        return True

    def _put_buffer(self) -> shm.PutBuffer | None:
        """The put buffer in the directory shared with the sidecar, made at the first Put
        (sender thread only); None without shared memory."""
        if self._put_buf is None and not self._put_off:
            directory = self.shared_dir()
            if directory is not None:
                try:
                    self._put_buf = shm.PutBuffer(directory)
                except OSError as exc:
                    log.warning("kvpool: no put buffer in %s: %s", directory, exc)
                    self._put_off = True
            elif self._shm_known:
                self._put_off = True
        return self._put_buf

    def _seal(self, spec: SaveSpec, num_layers: int) -> None:
        failed = spec.abort or spec.transfer_id in self._broken
        self._broken.discard(spec.transfer_id)
        self.client.seal(pb.SealRequest(
            transfer_id=spec.transfer_id, model=self.config.model,
            num_tokens=spec.num_prompt_tokens, num_layers=num_layers,
            push_to=spec.push_to, failed=failed,
        ))

    # -- decode: load

    def start_load_kv(self, meta: KVPoolConnectorMetadata) -> None:
        for spec in meta.loads:
            threading.Thread(target=self._load, args=(spec,), name="kvpool-load",
                             daemon=True).start()

    def shared_dir(self) -> Path | None:
        """The sidecar's shared-memory directory as this process reaches it, or None when
        it does not see the sidecar's files (asked once the sidecar answers)."""
        with self._shm_lock:
            if not self._shm_known:
                try:
                    info = self.client.info()
                except grpc.RpcError:
                    return None  # asked again at the next load
                self._shm_dir = shm.attach(info, self.config.shm_dir)
                self._shm_known = True
                if info.shm_dir:
                    log.info("kvpool: sidecar shared memory %s: %s", info.shm_dir,
                             f"mapped at {self._shm_dir}" if self._shm_dir
                             else "not visible here, chunks come as bytes")
            return self._shm_dir

    def _load(self, spec: LoadSpec) -> None:
        start = time.perf_counter()
        directory = self.shared_dir()
        try:
            nbytes = self._fill(spec, directory)
        except (grpc.RpcError, LoadError, ValueError, OSError) as exc:
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("kvpool: load of transfer %s failed, request %s recomputes: %s",
                        spec.transfer_id, spec.request_id, detail)
            if isinstance(exc, shm.ShmError):  # e.g. a restarted sidecar elsewhere: ask again
                with self._shm_lock:
                    self._shm_known = False
            with self._lock:
                self.stats["load_failures"] += 1
                self._failed.add(spec.request_id)
                self._finished.add(spec.request_id)
        else:
            log.info("kvpool: loaded transfer %s: %d tokens, %d bytes in %.1f ms",
                     spec.transfer_id, len(spec.token_ids) - spec.first_token, nbytes,
                     1e3 * (time.perf_counter() - start))
            with self._lock:
                self.stats["loaded"] += 1
                self._finished.add(spec.request_id)
        if directory is not None:
            try:  # after the request is reported: off its critical path
                self.client.release(spec.transfer_id)
            except grpc.RpcError as exc:  # the lease removes it
                log.debug("kvpool: release of transfer %s: %s", spec.transfer_id, exc.details())

    def _fill(self, spec: LoadSpec, directory: Path | None = None) -> int:
        """Write every chunk of the transfer into the request's blocks; returns bytes.
        With ``directory`` (shared with the sidecar), chunks may come as descriptors of
        shared memory, scattered from a mapping of it."""
        request = pb.LoadRequest(
            transfer_id=spec.transfer_id, model=self.config.model, peer=spec.peer,
            expect_push=spec.expect_push, first_token=spec.first_token,
            peer_instance=spec.peer_instance, shared_memory=directory is not None,
        )
        reader = shm.SegmentReader(directory) if directory is not None else None
        try:
            return self._scatter_all(spec, self.client.load(request), reader)
        finally:
            if reader is not None:
                reader.close()

    def _scatter_all(self, spec: LoadSpec, replies, reader: shm.SegmentReader | None) -> int:
        num_tokens = len(spec.token_ids)
        want = num_tokens - spec.first_token
        covered = [0] * len(self.layer_names)
        hashes: dict[int, bytes] = {}
        slots_of: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        nbytes = 0
        end: pb.TransferEnd | None = None
        # Read to the stream's close: a call left before its status is cancelled.
        for reply in replies:
            kind = reply.WhichOneof("item")
            if kind == "end":
                end = reply.end
                continue
            if end is not None:
                raise LoadError("the sidecar sent a chunk after the transfer's end")
            if kind == "shared":
                if reader is None:
                    raise LoadError("the sidecar sent a shared-memory descriptor unasked")
                chunk = reply.shared
                keys, values = reader.planes(chunk)
                nbytes += chunk.length
            else:
                chunk = reply.chunk
                keys = chunks.from_bytes(chunk.keys, chunk.dtype, chunk.width)
                values = chunks.from_bytes(chunk.values, chunk.dtype, chunk.width)
                nbytes += len(chunk.keys) + len(chunk.values)
            key = chunk.key
            if key.layer >= len(self.layer_names) or key.token_end > num_tokens:
                raise LoadError(f"chunk layer {key.layer} tokens [{key.token_start}, "
                                f"{key.token_end}) is outside this request")
            if key.token_end not in hashes:
                hashes[key.token_end] = chunks.prefix_hash(
                    self.config.model, spec.token_ids, key.token_end)
            if hashes[key.token_end] != key.prefix_hash:
                raise LoadError("chunk names another prompt prefix (prefix hash differs)")
            first = max(key.token_start, spec.first_token)
            skip = first - key.token_start
            if keys.shape[0] != key.token_end - key.token_start:
                raise LoadError("chunk size does not match its token range")
            kv_layer = self.kv_caches[self.layer_names[key.layer]]
            slots = slots_of.get((first, key.token_end))
            if slots is None:  # the same for every layer
                slots = slots_of[first, key.token_end] = chunks.token_slots(
                    spec.block_ids, self.config.block_size, first, key.token_end)
            chunks.layout_for(kv_layer).scatter(kv_layer, *slots, keys[skip:], values[skip:])
            covered[key.layer] += key.token_end - first
        if end is None:
            raise LoadError("the sidecar's stream ended without the transfer's end")
        if end.num_tokens != num_tokens:
            raise LoadError(f"transfer holds {end.num_tokens} tokens, the prompt has {num_tokens}")
        if any(c != want for c in covered):
            raise LoadError(f"tokens covered per layer {covered}, expected {want}")
        return nbytes

    def get_transfer_results(self) -> KVConnectorTransferResults:
        with self._lock:
            finished, failed = self._finished, self._failed
            self._finished, self._failed = set(), set()
        return KVConnectorTransferResults(finished_recving=finished, failed_recving=failed)

    def shutdown(self) -> None:
        self._outbox.put(None)
        self._sender.join(timeout=10)
        if self._put_buf is not None:
            self._put_buf.close()
            self._put_buf = None
        self.client.close()


# ---- the front class vLLM loads ------------------------------------------------------------


class KVPoolConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector of kvpool; see the module docstring for its configuration."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = ConnectorConfig.from_vllm(vllm_config)
        self.scheduler: KVPoolScheduler | None = None
        self.worker: KVPoolWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = KVPoolScheduler(config)
        else:
            self.worker = KVPoolWorker(config)

    # scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.request_finished(request, block_ids)

    # worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolConnectorMetadata)
        self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are asynchronous: a request runs only once its KV is in place."""

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolConnectorMetadata)
        self.worker.save_kv_layer(meta, layer_name, kv_layer)

    def wait_for_save(self) -> None:
        assert self.worker is not None
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            assert isinstance(meta, KVPoolConnectorMetadata)
            self.worker.wait_for_save(meta)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self.worker is not None
        return self.worker.get_transfer_results()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
