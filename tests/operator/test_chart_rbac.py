"""The chart's RBAC against what the operator really does.

The operator runs as the chart's Deployment would run it (its args and environment, the
liveness probe's path) against the API emulator, which records every request. A pool goes
through its life (create, scale decode, a child deleted by hand, delete); then each request is
turned into the (apiGroup, resource, verb) the Kubernetes RBAC authorizer would check, in
the namespace it targets, and must be granted by the chart's roles and bindings.

Only the chart's default, cluster-wide mode runs here: serving a list of namespaces, kopf
lists ``/api/v1/namespaces``, a path kmock 0.8 cannot parse. That mode's rules are checked
against kvpool.operator.rbac in test_chart_sources.py.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import kubernetes
import pytest
import yaml

from kvpool.operator import api, emulator, kube
from tests.operator.chart import EXAMPLES, Object, find, one, render
from tests.operator.conftest import Process, free_port, wait_for

Permission = tuple[str, str, str]
"""(apiGroup, resource[/subresource], verb), as an RBAC rule names them."""

TEST_AGENT = "kvpool-chart-rbac-test"
"""User agent of the test's own requests, which the recording leaves out."""


@attrs.define(kw_only=True)
class RecordingEmulator(emulator.ClusterEmulator):
    """The API emulator, keeping (method, path, query) of every request it serves, except
    the test's own (sent with the user agent :data:`TEST_AGENT`)."""

    log: list[tuple[str, str, dict[str, str]]] = attrs.field(factory=list, init=False)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.headers.get("User-Agent") != TEST_AGENT:
            self.log.append((str(request.method.value).upper(), request.url.path,
                             dict(request.params)))
        return await super()._handle(request)


class EmulatorThread:
    """A :class:`RecordingEmulator` served on loopback from an event loop of its own."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.emulator: RecordingEmulator | None = None
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete,
                                         args=(self._serve(),), daemon=True)
        self._thread.start()

    async def _serve(self) -> None:
        async with RecordingEmulator() as recording, \
                kmock.Server(recording, host="127.0.0.1") as server:
            self.emulator = recording
            self.kubeconfig.write_text(yaml.safe_dump(emulator.kubeconfig(str(server.url))))
            await self._stop.wait()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


def request_permission(method: str, path: str, query: dict[str, str]
                       ) -> tuple[str | None, Permission] | None:
    """(namespace or None, permission) the RBAC authorizer checks for a request; None for
    discovery paths, which every authenticated user may read."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource = "/".join(rest[0:3:2])  # plural, or plural/subresource
    name = rest[1] if len(rest) > 1 else None
    verb = {
        "GET": "get" if name else ("watch" if query.get("watch") in ("1", "true") else "list"),
        "POST": "create", "PUT": "update", "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }[method]
    return namespace, (group, resource, verb)


def permissions(rules: list[dict[str, Any]]) -> set[Permission]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def allowed(objects: list[Object], namespace: str | None, permission: Permission) -> bool:
    """Whether the chart's bindings grant ``permission`` in ``namespace`` (None: cluster)."""
    roles = {role["metadata"]["name"]: role["rules"] for role in find(objects, "ClusterRole")}
    for binding in find(objects, "ClusterRoleBinding"):
        if permission in permissions(roles[binding["roleRef"]["name"]]):
            return True
    return namespace is not None and any(
        permission in permissions(roles[binding["roleRef"]["name"]])
        for binding in find(objects, "RoleBinding")
        if binding["metadata"]["namespace"] == namespace
    )


def run_pool_lifecycle(client: kube.Client, namespace: str) -> None:
    """Create the CPU example pool, scale decode, delete a child by hand, delete the pool."""
    pool = yaml.safe_load((EXAMPLES / "pool-cpu.yaml").read_text())
    name = pool["metadata"]["name"]
    pool["metadata"]["namespace"] = namespace
    pool_path = kube.path(api.API_VERSION, api.KIND, namespace, name)
    client.request("POST", kube.path(api.API_VERSION, api.KIND, namespace), body=pool)

    def deployment(role: str) -> dict[str, Any] | None:
        return client.get("apps/v1", "Deployment", namespace, f"{name}-{role}")

    wait_for(lambda: deployment("decode") and deployment("router"), 60, "the pool's children")
    # What `kubectl scale kvp` changes (the emulator has no scale subresource).
    client.request("PATCH", pool_path, body={"spec": {"decode": {"replicas": 2}}},
                   content_type="application/merge-patch+json")
    wait_for(lambda: (deployment("decode") or {}).get("spec", {}).get("replicas") == 2, 60,
             "decode scaled to 2")
    client.request("DELETE", kube.path("apps/v1", "Deployment", namespace, f"{name}-router"))
    wait_for(lambda: deployment("router"), 60, "the router Deployment put back")
    client.request("DELETE", pool_path)
    wait_for(lambda: client.get(api.API_VERSION, api.KIND, namespace, name) is None, 60,
             "the pool deleted")


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[EmulatorThread]:
    thread = EmulatorThread(tmp_path / "kubeconfig")
    try:
        wait_for(thread.kubeconfig.exists, 30, "the emulator")
        yield thread
    finally:
        thread.stop()


@pytest.mark.slow
def test_chart_rbac_grants_every_request_the_operator_makes(
    recording: EmulatorThread, tmp_path: Path
) -> None:
    namespace = "default"
    objects = render(tmp_path)
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    port = free_port()
    args = [a.replace("http://0.0.0.0:8080/", f"http://127.0.0.1:{port}/")
            for a in container["args"]]
    env = dict(os.environ, KUBECONFIG=str(recording.kubeconfig), POD_ID="kvpool-0",
               **{e["name"]: e["value"] for e in container["env"] if "value" in e})
    operator = Process([sys.executable, "-m", "kvpool.cli", *args], tmp_path / "operator.log",
                       env)
    probe = container["livenessProbe"]["httpGet"]["path"]
    try:
        def alive() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(alive, 60, "the liveness endpoint the chart probes")
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(recording.kubeconfig),
                                           client_configuration=configuration)
        api_client = kubernetes.client.ApiClient(configuration)
        api_client.user_agent = TEST_AGENT
        run_pool_lifecycle(kube.Client(api_client, 10), namespace)
    except BaseException:
        print(operator.tail(), file=sys.stderr)
        raise
    finally:
        operator.stop()

    assert recording.emulator is not None
    operator_used = {found for entry in recording.emulator.log
                     if (found := request_permission(*entry)) is not None}
    denied = sorted((ns or "-", *perm) for ns, perm in operator_used
                    if not allowed(objects, ns, perm))
    assert not denied, f"the chart does not grant what the operator did: {denied}"
    verbs = {perm for _, perm in operator_used}
    for expected in [("kvpool.dev", "kvcachepools", "watch"),
                     ("kvpool.dev", "kvcachepools/status", "patch"),
                     ("apps", "deployments", "patch")]:
        assert expected in verbs, f"the operator never did {expected}: recording broken?"
