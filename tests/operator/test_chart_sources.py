"""What the chart shares with the operator's code: the generated CRDs, the RBAC rules, the
command line, the example pools. Each has one source in kvpool.operator; these tests keep the
chart equal to it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kvpool import cli
from kvpool.operator import api, crd, rbac, schema, validation
from tests.operator.chart import (
    CHART,
    EXAMPLES,
    ROOT,
    Object,
    chart_crds,
    find,
    load_yaml_documents,
    one,
    render,
    validate,
)

EXAMPLE_POOLS = sorted(EXAMPLES.glob("pool*.yaml"))


def test_chart_crds_are_the_generated_ones() -> None:
    """charts/kvpool/crds/ holds exactly what `kvpool crd --write` produces (`make crds`)."""
    generated = crd.files()
    on_disk = {path.name: path.read_text() for path in (CHART / "crds").glob("*.yaml")}
    assert sorted(on_disk) == sorted(generated), "run `make crds`"
    for name, text in generated.items():
        assert on_disk[name] == text, f"charts/kvpool/crds/{name} is stale: run `make crds`"
        assert (ROOT / "crds" / name).read_text() == text


def _permissions(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _granted(objects: list[Object]) -> set[tuple[str, str, str]]:
    """Every (apiGroup, resource, verb) the release's bindings grant its ServiceAccount."""
    roles = {role["metadata"]["name"]: role["rules"] for role in find(objects, "ClusterRole")}
    bound = {b["roleRef"]["name"] for b in find(objects, "ClusterRoleBinding")}
    bound |= {b["roleRef"]["name"] for b in find(objects, "RoleBinding")}
    return _permissions([rule for name in bound for rule in roles[name]])


def _operator_needs(unused_peering: str) -> set[tuple[str, str, str]]:
    """kvpool.operator.rbac's rules, less the kopf peering kind this mode never touches
    (kopf meets in a ClusterKopfPeering when it serves every namespace, else in a
    KopfPeering per namespace; the operator's rules cover both modes)."""
    return {p for p in _permissions(rbac.rules()) if p[1] != unused_peering}


def test_cluster_wide_rbac_is_exactly_what_the_operator_needs(tmp_path: Path) -> None:
    assert _granted(render(tmp_path)) == _operator_needs("kopfpeerings")


def test_namespaced_rbac_is_exactly_what_the_operator_needs(tmp_path: Path) -> None:
    objects = render(tmp_path, {"operator": {"watchNamespaces": ["team-a", "team-b"]}})
    assert _granted(objects) == _operator_needs("clusterkopfpeerings")
    # The pools' rules are bound only inside the served namespaces.
    assert [b["roleRef"]["name"] for b in find(objects, "ClusterRoleBinding")] == [
        "kvpool-cluster"
    ]


@pytest.mark.parametrize(
    ("values", "namespaces"),
    [(None, []), ({"operator": {"watchNamespaces": ["a", "b"], "verbose": True}}, ["a", "b"])],
    ids=["cluster-wide", "namespaced"],
)
def test_operator_command_line_is_what_kvpool_operator_accepts(
    values: dict | None, namespaces: list[str], tmp_path: Path
) -> None:
    """The Deployment's args parse with the real `kvpool operator` parser, to the same meaning."""
    pod = one(render(tmp_path, values), "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = cli.build_parser(container["args"]).parse_args(container["args"])
    assert args.command == "operator"
    assert args.namespace == namespaces
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert args.verbose is bool(values)
    assert not args.standalone  # several replicas: kopf peering stays on


def valid_pool(pool: Object) -> api.KVCachePoolSpec:
    """``pool``'s spec, once checked as the API server and the operator check it."""
    assert pool["apiVersion"] == api.API_VERSION and pool["kind"] == api.KIND
    assert len(pool["metadata"]["name"]) <= api.MAX_NAME_LENGTH
    validate(pool, chart_crds())  # the CRD's structural schema, unknown fields rejected
    spec = api.load_spec(pool["spec"])  # the operator's own reading, with its defaults
    # The CRD's CEL rules, on the pool as the API server sees it once defaulted.
    assert validation.violations({"metadata": pool["metadata"], "spec": schema.dump(spec)}) == []
    return spec


@pytest.mark.parametrize("path", EXAMPLE_POOLS, ids=lambda p: p.name)
def test_example_pools_are_valid(path: Path) -> None:
    (pool,) = load_yaml_documents([path])
    valid_pool(pool)


def test_the_gpu_examples_commented_profile_is_valid() -> None:
    """examples/pool.yaml shows ``transfer.profile`` commented out: uncommented, it holds."""
    text = (EXAMPLES / "pool.yaml").read_text()
    uncommented = re.sub(r"^( +)# (profile:|  \S.*)$", r"\1\2", text, flags=re.MULTILINE)
    spec = valid_pool(yaml.safe_load(uncommented))
    assert spec.transfer.profile is not None
    assert spec.transfer.profile.persistent_volume_claim is not None


def test_examples_cover_gpu_and_cpu() -> None:
    specs = {p.name: api.load_spec(load_yaml_documents([p])[0]["spec"]) for p in EXAMPLE_POOLS}
    assert specs["pool.yaml"].transfer.transport == "nixl"
    assert specs["pool.yaml"].prefill.gpus >= 1 and specs["pool.yaml"].decode.gpus >= 1
    assert specs["pool-cpu.yaml"].prefill.gpus == 0 and specs["pool-cpu.yaml"].decode.gpus == 0
    assert specs["pool-cpu.yaml"].transfer.transport == "grpc"
