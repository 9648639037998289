"""What vLLM engines and P/D requests need to use kvpool's transfer (imports no vLLM).

An engine with the connector, beside a sidecar listening on ``unix:///run/p.sock``::

    kvpool sidecar --local unix:///run/p.sock --peer 0.0.0.0:7600 --level default
    VLLM_CPU_KVCACHE_SPACE=1 python -m vllm.entrypoints.openai.api_server \\
        --model DIR --block-size 32 \\
        --kv-transfer-config "$(python -c 'import json, kvpool.sidecar.vllm_args as a;
                                print(json.dumps(a.kv_transfer_config("unix:///run/p.sock")))')"

which is ``--kv-transfer-config '{"kv_connector": "KVPoolConnector",
"kv_connector_module_path": "kvpool.sidecar.connector", "kv_role": "kv_both",
"kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"sidecar":
"unix:///run/p.sock"}}'``. The same engine serves as prefill and as decode worker.

A request then goes (the router's job):

1. to a prefill engine with ``max_tokens: 1`` and ``"kv_transfer_params":
   prefill_params(push_to=<decode sidecar's peer address>)`` in the request body;
2. to a decode engine with the same prompt and ``"kv_transfer_params"`` copied from the
   prefill response (``response["kv_transfer_params"]``).
"""

from __future__ import annotations

from typing import Any

CONNECTOR = "KVPoolConnector"
CONNECTOR_MODULE = "kvpool.sidecar.connector"


def kv_transfer_config(
    sidecar: str,
    *,
    role: str = "kv_both",
    level: str = "",
    failure_policy: str = "recompute",
    load_timeout_s: float = 30.0,
    shm_dir: str = "",
) -> dict[str, Any]:
    """vLLM's ``--kv-transfer-config`` (as a dict; pass it through ``json.dumps``).

    ``sidecar``: the local sidecar's ``--local`` address. ``role``: ``kv_both``,
    ``kv_producer`` (prefill only) or ``kv_consumer`` (decode only). ``level``: level of
    this engine's chunks (empty: the sidecar's ``--level``). ``failure_policy``:
    ``recompute`` (decode recomputes a prompt whose KV cannot arrive) or ``fail``.
    ``shm_dir``: this engine's path to the memory-backed directory it shares with the
    sidecar (empty: the path the sidecar announces; ``off``: bytes over the socket only).
    """
    extra: dict[str, Any] = {"sidecar": sidecar, "load_timeout_s": load_timeout_s}
    if level:
        extra["level"] = level
    if shm_dir:
        extra["shm_dir"] = shm_dir
    return {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": role,
        "kv_load_failure_policy": failure_policy,
        "kv_connector_extra_config": extra,
    }


def prefill_params(push_to: str = "", level: str = "") -> dict[str, Any]:
    """``kv_transfer_params`` of a prefill request. ``push_to``: the decode sidecar's peer
    address, to stream the KV there while the prompt is computed (else decode pulls it
    once it gets the request); ``level``: this request's level (default: the engine's)."""
    params: dict[str, Any] = {"do_remote_decode": True}
    if push_to:
        params["kvpool_push_to"] = push_to
    if level:
        params["kvpool_level"] = level
    return params
