"""Render ``charts/kvpool`` with the real helm binary and validate what comes out.

helm comes from :mod:`kvpool.k8s_tools` (extracted from the dev extra): ``helm`` is Helm 4,
``helm3`` Helm 3; the chart must work with both. Built-in kinds are validated strictly against the
Kubernetes OpenAPI schemas of ``kubernetes-validate`` for the oldest Kubernetes the chart
supports and the newest the package knows; custom resources against the openAPIV3Schema
of the chart's own CRDs, with unknown fields rejected as ``kubectl --validate=strict`` does.
"""

from __future__ import annotations

import copy
import functools
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from kvpool import k8s_tools

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kvpool"
EXAMPLES = ROOT / "examples"
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
"""The chart's minimum kubeVersion (Chart.yaml) and the newest schemas at hand."""

Object = dict[str, Any]


class HelmError(RuntimeError):
    """helm exited non-zero; the message is its stderr."""


HELMS = ("helm", "helm3")
"""The helm binaries of kvpool.k8s_tools: Helm 4 and Helm 3."""


@functools.cache
def helm_binary(name: str = "helm") -> Path:
    return k8s_tools.tool(name)


def helm(*args: str | Path, cwd: Path | None = None, binary: str = "helm") -> str:
    """Run helm, return its stdout; raise :class:`HelmError` with stderr on failure."""
    proc = subprocess.run(
        [str(helm_binary(binary)), *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=cwd, check=False,
    )
    if proc.returncode != 0:
        raise HelmError(proc.stderr.strip() or proc.stdout.strip())
    return proc.stdout


def write_values(path: Path, values: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(values), sort_keys=False))
    return path


def render(
    tmp_path: Path,
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "kvpool",
    namespace: str = "kvpool-system",
    include_crds: bool = False,
    binary: str = "helm",
) -> list[Object]:
    """``helm template`` the chart with ``values``; the objects it prints, in order."""
    args: list[str | Path] = ["template", release, CHART, "--namespace", namespace]
    if values is not None:
        args += ["--values", write_values(tmp_path / f"values-{release}.yaml", values)]
    if include_crds:
        args.append("--include-crds")
    return [doc for doc in yaml.safe_load_all(helm(*args, binary=binary)) if doc]


def load_yaml_documents(paths: Iterable[Path]) -> list[Object]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def chart_crds() -> list[Object]:
    return load_yaml_documents(sorted((CHART / "crds").glob("*.yaml")))


def find(objects: Iterable[Object], kind: str, name: str | None = None) -> list[Object]:
    return [
        obj for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]


def one(objects: Iterable[Object], kind: str, name: str | None = None) -> Object:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _strict(schema: Any) -> Any:
    """A copy of a structural CRD schema where objects accept only the fields they declare."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def custom_resource_schema(crds: Iterable[Object], api_version: str, kind: str) -> Object | None:
    """The strict openAPIV3Schema ``crds`` give ``kind`` at ``api_version``, if any."""
    group, _, version = api_version.rpartition("/")
    for crd in crds:
        spec = crd["spec"]
        if spec["group"] != group or spec["names"]["kind"] != kind:
            continue
        for served in spec["versions"]:
            if served["name"] == version:
                schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])
                schema.setdefault("properties", {}).update(
                    apiVersion={"type": "string"}, kind={"type": "string"},
                    metadata={"type": "object"},
                )
                return _strict(schema)
    return None


def validate(obj: Object, crds: Iterable[Object] = ()) -> None:
    """Raise if ``obj`` is not a valid object for every Kubernetes version the chart supports."""
    crds = list(crds)
    schema = custom_resource_schema(crds, obj["apiVersion"], obj["kind"])
    if schema is not None:
        jsonschema.validate(obj, schema)
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)
