"""Every command the operator's pods run, parsed by the parsers of the programs that run it.

``kvpool sidecar`` and ``kvpool router`` go through ``kvpool.cli.build_parser``; the vLLM
server's arguments through vLLM's own server parser, and its ``--kv-transfer-config``
through :class:`KVPoolConnector`'s config reader. A flag, URL form or connector key that
the data plane renames, or a transfer setting of the pool that stops reaching it, fails
here. The kubelet's ``$(VAR)`` expansion is applied first, from the container's env and
the pool's ConfigMap, as in a pod.
"""

from __future__ import annotations

import argparse
import importlib
import re
from types import SimpleNamespace
from typing import Any

import pytest

from kvpool import cli
from kvpool.operator import api, children
from tests.operator.test_children import CASES, POOL, SETTINGS

POD_IP = "10.1.2.3"

POOLS: dict[str, dict[str, Any]] = {
    **CASES,
    "raw": {**CASES["minimal"], "transfer": {"codec": "raw", "failurePolicy": "fail"}},
    "lossless": {**CASES["minimal"], "transfer": {"lossless": True, "timeoutMs": 30000}},
    "fixed-level": {**CASES["minimal"],
                    "transfer": {"level": "high", "ttftTargetMs": 500, "chunkTokens": 512}},
    "plaintext": {**CASES["minimal"], "transfer": {"tls": {"mode": "plaintext"}}},
    # A file name the kubelet would expand, were it not escaped.
    "profile-image": {**CASES["minimal"], "transfer": {"profile": {
        "image": {"reference": "registry.example/profiles/smollm:v1"},
        "path": "smollm/$(KVPOOL_LEVEL).kvprofile"}}},
}


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's expansion of ``$(VAR)`` in command and args (``$$`` escapes ``$``)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        assert name in env, f"$({name}) is not defined in the container's environment"
        return env[name]

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def container_env(container: dict[str, Any], config_maps: dict[str, dict[str, str]]) -> dict[
        str, str]:
    """What the kubelet gives the container: envFrom ConfigMaps, then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= config_maps[source["configMapRef"]["name"]]
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, var
            env[var["name"]] = POD_IP
    return env


class Pod:
    """One rendered pod template, its containers' argv after expansion."""

    def __init__(self, objects: list[dict[str, Any]], name: str) -> None:
        by_key = {(o["kind"], o["metadata"]["name"]): o for o in objects}
        config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
        self.spec = by_key["Deployment", name]["spec"]["template"]["spec"]
        self.argv: dict[str, list[str]] = {}
        self.ports: dict[str, dict[str, int]] = {}
        for c in self.spec["containers"]:
            env = container_env(c, config_maps)
            self.argv[c["name"]] = [expand(a, env) for a in [*c["command"], *c["args"]]]
            self.ports[c["name"]] = {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def rendered(case: str) -> list[dict[str, Any]]:
    return children.render(POOL, api.load_spec(POOLS[case]), SETTINGS)


def kvpool_args(argv: list[str]) -> argparse.Namespace:
    """Parse a ``kvpool ...`` container command as the ``kvpool`` entry point does."""
    assert argv[0] == "kvpool", argv
    return cli.build_parser(argv[1:]).parse_args(argv[1:])


@pytest.fixture(scope="module")
def vllm_parser() -> argparse.ArgumentParser:
    """vLLM's OpenAI server parser (what ``python -m vllm.entrypoints.openai.api_server``
    builds before serving)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def vllm_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"], argv
    args = parser.parse_args(argv[3:])
    validate_parsed_serve_args(args)
    return args


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@pytest.mark.parametrize("case", sorted(POOLS))
@pytest.mark.parametrize("role", api.ROLES)
def test_sidecar_command_parses_with_the_pools_transfer_settings(case: str, role: str) -> None:
    spec = api.load_spec(POOLS[case])
    pod = Pod(rendered(case), f"demo-{role}")
    args = kvpool_args(pod.argv["sidecar"])
    assert args.command == "sidecar"
    assert args.local == f"unix://{SETTINGS.socket_dir}/{children.SOCKET_NAME}"
    assert port_of(args.peer) == pod.ports["sidecar"]["kv"] == SETTINGS.sidecar_port
    assert args.advertise == f"{POD_IP}:{SETTINGS.sidecar_port}"  # what decode pulls from
    assert port_of(args.metrics) == pod.ports["sidecar"]["metrics"]
    assert args.transport == spec.transfer.transport
    assert args.level == children.sidecar_level(spec.transfer)
    assert args.ttft_target_ms == spec.transfer.ttft_target_ms
    assert args.transfer_timeout_s == spec.transfer.timeout_ms / 1000
    sidecar = next(c for c in pod.spec["containers"] if c["name"] == "sidecar")
    profile = spec.transfer.profile
    if profile is None:
        assert not args.profile
    else:  # --profile is the file inside the profile's volume, mounted read-only
        mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "kvpool-profile")
        assert mount["readOnly"] is True
        assert args.profile == f"{mount['mountPath']}/{profile.path}"
    secret = children.tls_secret_name("demo", spec)
    for probe in ("readinessProbe", "livenessProbe"):
        if secret is None:  # plaintext: the gRPC health service on the peer port
            assert sidecar[probe]["grpc"]["port"] == port_of(args.peer)
        else:  # kubelet's gRPC probe cannot speak mTLS: the metrics port's HTTP
            assert sidecar[probe]["httpGet"] == {"path": "/transfer/health", "port": "metrics"}
    if secret is None:
        assert not args.tls_dir
        return
    # --tls-dir is where the pool's Secret is mounted, read-only.
    volume = next(v["name"] for v in pod.spec["volumes"]
                  if v.get("secret", {}).get("secretName") == secret)
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == volume)
    assert mount["mountPath"] == args.tls_dir and mount["readOnly"] is True
    assert not any(m["name"] == volume for c in pod.spec["containers"] if c["name"] != "sidecar"
                   for m in c.get("volumeMounts", []))


def test_sidecar_levels_follow_codec_and_lossless() -> None:
    levels = {case: kvpool_args(Pod(rendered(case), "demo-prefill").argv["sidecar"]).level
              for case in POOLS}
    assert levels == {"minimal": "adaptive", "full": "low", "raw": "raw",
                      "lossless": "lossless", "fixed-level": "high", "plaintext": "adaptive",
                      "profile-image": "adaptive"}


@pytest.mark.parametrize("case", sorted(POOLS))
def test_router_command_parses_and_reaches_both_roles(case: str) -> None:
    from kvpool.sidecar import router

    objects = rendered(case)
    pod = Pod(objects, "demo-router")
    args = kvpool_args(pod.argv["router"])
    assert args.command == "router"
    assert args.port == pod.ports["router"]["http"]
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for role, urls in (("prefill", args.prefill), ("decode", args.decode)):
        (url,) = urls
        assert url == f"http://demo-{role}.serving.svc:{SETTINGS.vllm_port}"
        http = {p["name"]: p["port"] for p in services[f"demo-{role}"]["spec"]["ports"]}["http"]
        assert port_of(url) == http
    # The router's own checks of what it was given (URL form, one sidecar per decode).
    router.Router(args.prefill, args.decode, decode_sidecars=args.decode_sidecar)


@pytest.mark.parametrize("case", sorted(POOLS))
@pytest.mark.parametrize("role", api.ROLES)
def test_vllm_command_loads_the_connector_as_it_reads_its_config(
    case: str, role: str, vllm_parser: argparse.ArgumentParser
) -> None:
    spec = api.load_spec(POOLS[case])
    pod = Pod(rendered(case), f"demo-{role}")
    args = vllm_args(vllm_parser, pod.argv["vllm"])
    assert args.port == pod.ports["vllm"]["http"]
    assert args.block_size == spec.transfer.block_size
    if role == "prefill":  # one prefill step is one chunk
        assert args.max_num_batched_tokens == spec.transfer.chunk_tokens
        assert args.max_num_seqs <= args.max_num_batched_tokens

    kv = args.kv_transfer_config  # parsed by vLLM into its KVTransferConfig
    assert kv.kv_role == children.KV_ROLES[role]
    assert kv.kv_load_failure_policy == spec.transfer.failure_policy
    module = importlib.import_module(kv.kv_connector_module_path)
    connector = getattr(module, kv.kv_connector)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert issubclass(connector, KVConnectorBase_V1)

    # A stand-in for VllmConfig with only what ConnectorConfig.from_vllm reads.
    vllm_config = SimpleNamespace(
        kv_transfer_config=kv,
        model_config=SimpleNamespace(served_model_name=args.served_model_name[0]),
        cache_config=SimpleNamespace(block_size=args.block_size),
    )
    config = module.ConnectorConfig.from_vllm(vllm_config)
    sidecar = kvpool_args(pod.argv["sidecar"])
    assert config.sidecar == sidecar.local
    assert config.load_timeout_s == sidecar.transfer_timeout_s
    assert config.model == (spec.model.served_name or spec.model.name)
