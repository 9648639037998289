"""A Kubernetes API emulator on loopback, for the operator's tests and benchmark.

No kube-apiserver runs here, so the operator is exercised against ``kmock``'s
``KubernetesEmulator`` (an in-memory object store behind the Kubernetes REST paths),
extended with what kmock 0.8 leaves out and kopf needs:

- metadata an API server sets: ``uid``, ``resourceVersion`` (one counter, bumped on
  every change), ``creationTimestamp``, ``generation`` (bumped when ``spec`` changes),
  ``namespace`` from the URL, names from ``generateName``;
- ``kind``/``apiVersion``/``resourceVersion`` on list replies;
- the ``status`` subresource (a write there changes only ``status``; a write to the
  object itself leaves ``status`` alone) for every resource that has one;
- server-side apply creating an object that is absent, and writes that change nothing
  answering without a new version or a watch event (as a real API server does);
- discovery of Kubernetes' built-in resources and of the project's CRDs;
- no log of served requests (kmock keeps every request and scans them all for each new
  one, which makes a benchmark of thousands of requests quadratic), and plain reads and
  writes answered without kmock's generic reaction matching.

What it does not emulate: CEL and schema validation, defaulting, field ownership
(apply merges like a JSON merge patch: maps merge, lists are replaced), controllers
(no Deployment ever gets ready unless a test writes its status), garbage collection.

Run it alone with ``python -m kvpool.operator.emulator --kubeconfig PATH``: it prints its
URL and writes a kubeconfig pointing at it, then serves until stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import itertools
import pathlib
import signal
import sys
import typing
import uuid
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import dicts, enums

from kvpool.operator import crd

_VOLATILE = ("resourceVersion", "managedFields", "generation")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _comparable(obj: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k not in _VOLATILE}
    return {**obj, "metadata": meta}


@attrs.define(kw_only=True)
class _DirectReplies(kmock.RawHandler):
    """Answers plain reads and writes straight from the emulator's store.

    Placed after kmock's emulator in the method resolution order, it receives the
    requests once kmock has stored their effects, and skips kmock's generic reaction
    matching (its cost grows with every reaction and criterion); watches and anything
    else still go through kmock.
    """

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        serve = None
        if request.action is not None and request.resource is not None \
                and request.resource.plural:  # not discovery
            emulator = typing.cast(kmock.KubernetesEmulator, self)
            serve = {
                enums.action.FETCH: emulator._serve_fetch,
                enums.action.LIST: emulator._serve_list,
                enums.action.CREATE: emulator._serve_create,
                enums.action.UPDATE: emulator._serve_update,
                enums.action.DELETE: emulator._serve_delete if request.name else None,
            }.get(request.action)
        if serve is None:
            return await super()._handle(request)
        return aiohttp.web.json_response(await serve(request))


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator, _DirectReplies):
    """kmock's emulator with the API-server behaviour listed in the module docstring."""

    _revisions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        for definition in crd.all_crds():
            spec = definition["spec"]
            for version in spec["versions"]:
                key = f"{spec['group']}/{version['name']}/{spec['names']['plural']}"
                self.resources[key] = kmock.ResourceInfo(
                    kind=spec["names"]["kind"],
                    singular=spec["names"].get("singular"),
                    namespaced=spec["scope"] == "Namespaced",
                    shortnames=spec["names"].get("shortNames", []),
                    verbs=["create", "delete", "get", "list", "patch", "update", "watch"],
                    subresources=list(version.get("subresources", {})),
                )

    def _has_status(self, resource: kmock.resource | None) -> bool:
        if resource is None or resource not in self.resources:
            return False
        return "status" in self.resources[resource].subresources

    @staticmethod
    def _key(request: kmock.Request) -> tuple[kmock.resource, str | None, str]:
        assert request.resource is not None and request.name is not None
        return request.resource, request.namespace, request.name

    def _current(self, request: kmock.Request) -> dict[str, Any] | None:
        key = self._key(request)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # kmock logs every request and matches each new one by scanning that log: quadratic
        # under load. Served requests leave the log (this emulator asserts on objects).
        try:
            return await self._handle_k8s(request)
        finally:
            with contextlib.suppress(ValueError):
                self._requests.remove(request)

    async def _handle_k8s(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and isinstance(request.data, dict):
            if request.action == enums.action.CREATE:
                self._prepare_create(request, request.data)
            elif request.action == enums.action.UPDATE and request.name is not None:
                current = self._current(request)
                is_apply = "apply-patch" in request.headers.get("Content-Type", "")
                if current is None and is_apply and request.subresource is None:
                    return await self._create_by_apply(request)
                if current is not None:
                    unchanged = self._prepare_update(request, current)
                    if unchanged:
                        return aiohttp.web.json_response(current)
        return await super()._handle(request)

    async def _create_by_apply(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """Server-side apply of an absent object creates it (kmock only patches)."""
        self._prepare_create(request, request.data)
        key = self._key(request)
        async with self._lock:
            if key in self.objects:
                self.objects[key].create(request.data)
            else:
                self.objects[key] = request.data
            raw = self.objects[key].raw
            await self._buses[key[0]].put({"type": "ADDED", "object": raw})
        return aiohttp.web.json_response(raw, status=201)

    def _prepare_create(self, request: kmock.Request, data: dict[str, Any]) -> None:
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._revisions))
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)

    def _prepare_update(self, request: kmock.Request, current: dict[str, Any]) -> bool:
        """Turn the patch into what the API server would store; True when nothing changes."""
        data: dict[str, Any] = request.data
        if request.subresource == "status":
            kept = {"status": data.get("status")} if "status" in data else {}
            data.clear()
            data.update(kept)
        elif self._has_status(request.resource):
            data.pop("status", None)
        for field in ("apiVersion", "kind"):
            data.pop(field, None)
        meta = data.get("metadata")
        if isinstance(meta, dict):
            for field in ("uid", "creationTimestamp", "resourceVersion", "generation",
                          "namespace", "name", "managedFields"):
                meta.pop(field, None)
        merged = dict(dicts.patch_dict(copy.deepcopy(current), data))
        if _comparable(merged) == _comparable(current):
            return True
        new_meta = data.setdefault("metadata", {})
        new_meta["resourceVersion"] = str(next(self._revisions))
        if merged.get("spec") != current.get("spec"):
            new_meta["generation"] = current.get("metadata", {}).get("generation", 0) + 1
        return False

    async def _serve_list(self, request: kmock.Request) -> dict[str, Any]:
        answer = typing.cast(dict[str, Any], await super()._serve_list(request))
        assert request.resource is not None
        info = self.resources[request.resource]
        group, version = request.resource.group, request.resource.version
        answer["apiVersion"] = f"{group}/{version}" if group else version
        answer["kind"] = f"{info.kind}List"
        answer["metadata"] = {"resourceVersion": str(next(self._revisions))}
        return answer


def kubeconfig(url: str) -> dict[str, Any]:
    """A kubeconfig for the emulator (no TLS, no credentials: it is on loopback)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {"token": "emulator"}}],
        "contexts": [{"name": "emulator",
                      "context": {"cluster": "emulator", "user": "emulator",
                                  "namespace": "default"}}],
        "current-context": "emulator",
    }


async def serve(kubeconfig_path: pathlib.Path, stop: asyncio.Event) -> None:
    """Serve on a free loopback port until ``stop`` is set; write the kubeconfig first."""
    async with ClusterEmulator() as emulator, kmock.Server(emulator, host="127.0.0.1") as server:
        url = str(server.url).rstrip("/")
        tmp = kubeconfig_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(kubeconfig(url)))
        tmp.replace(kubeconfig_path)  # atomic: readers never see half a file
        print(url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvpool.operator.emulator",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", type=pathlib.Path, required=True,
                        help="where to write a kubeconfig pointing at the emulator")
    args = parser.parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.kubeconfig, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
