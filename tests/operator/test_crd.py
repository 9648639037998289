"""The generated CRDs: crds/ matches the generator, and every CRD is a valid, structural object."""

from __future__ import annotations

import pathlib

import kubernetes_validate
import pytest
import yaml

from kvpool.operator import api, crd

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(crd.files()))
def test_crds_directory_is_generated(name: str) -> None:
    path = REPO / "crds" / name
    assert path.is_file(), f"{path} missing: run `make crds`"
    assert path.read_text() == crd.files()[name], f"{path} is stale: run `make crds`"


@pytest.mark.parametrize("doc", crd.all_crds(), ids=lambda d: d["metadata"]["name"])
def test_crd_validates_against_kubernetes_schema(doc: dict) -> None:
    kubernetes_validate.validate(doc, "1.33", strict=True)


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural() -> None:
    """Every node has a type (or is int-or-string / preserve-unknown-fields), as v1 CRDs demand."""
    root = crd.kvcachepool_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if node.get("type") == "object" and path not in (".metadata",):
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), path


def test_crd_names_scale_and_columns() -> None:
    doc = crd.kvcachepool_crd()
    assert doc["metadata"]["name"] == "kvcachepools.kvpool.dev"
    assert doc["spec"]["names"]["shortNames"] == ["kvp"]
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.decode.replicas"
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Prefill", "Decode", "Transport", "Codec", "Ready", "Transfers", "Saved",
                       "Endpoint", "Age"]


def test_cli_prints_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    from kvpool.cli import main

    assert main(["crd"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == crd.kvcachepool_crd()


def test_defaults_match_between_schema_and_loader() -> None:
    """The API server's defaulting (from the schema) and load_spec() give the same spec."""
    spec_schema = crd.kvcachepool_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]
    assert spec_schema["properties"]["transfer"]["default"] == {}
    transfer = spec_schema["properties"]["transfer"]["properties"]
    loaded = api.load_spec({"model": {"name": "m"}, "image": "img"})
    assert transfer["chunkTokens"]["default"] == loaded.transfer.chunk_tokens
    assert transfer["transport"]["enum"] == ["grpc", "nixl"]


def _schema_at(root: dict, dotted: str) -> dict:
    node = root
    for part in dotted.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_scale_subresource_paths_exist_in_the_schema() -> None:
    """HPA and `kubectl scale` reach decode through these paths: they must be real fields."""
    version = crd.kvcachepool_crd()["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    scale = version["subresources"]["scale"]
    assert _schema_at(root, scale["specReplicasPath"])["type"] == "integer"
    assert _schema_at(root, scale["statusReplicasPath"])["type"] == "integer"
    assert _schema_at(root, scale["labelSelectorPath"])["type"] == "string"
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"].split("[")[0]
        if path.startswith((".spec", ".status")):
            _schema_at(root, path)


def test_rbac_rules_cover_every_child_kind() -> None:
    from kvpool.operator import children, rbac
    from kvpool.operator.settings import RenderSettings

    spec = api.load_spec({"model": {"name": "m"}, "image": "img"})
    objects = children.render(children.PoolRef("p", "ns", "uid"), spec, RenderSettings())
    granted = {(group, resource): set(rule["verbs"]) for rule in rbac.rules()
               for group in rule["apiGroups"] for resource in rule["resources"]}
    plurals = {"ConfigMap": "configmaps", "Service": "services", "Deployment": "deployments",
               "PodDisruptionBudget": "poddisruptionbudgets"}
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        verbs = granted[group, plurals[obj["kind"]]]
        assert {"get", "list", "watch", "patch", "delete"} <= verbs, obj["kind"]
    assert "patch" in granted["kvpool.dev", "kvcachepools/status"]
    assert "create" in granted["", "events"]
