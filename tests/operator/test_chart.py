"""The Helm chart charts/kvpool: lint, render, validate, secure, least privilege, values schema."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.chart import (
    CHART,
    HELMS,
    HelmError,
    Object,
    chart_crds,
    find,
    helm,
    one,
    render,
    validate,
    write_values,
)

CUSTOM: dict[str, Any] = {
    "image": {"repository": "registry.example/kvpool", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "fullnameOverride": "kvp-op",
    "operator": {
        "replicas": 3,
        "livenessPort": 9090,
        "verbose": True,
        "clusterDomain": "k8s.example",
        "extraArgs": ["--priority=10"],
        "extraEnv": [{"name": "KVPOOL_EXTRA", "value": "1"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                      "limits": {"cpu": "1", "memory": "1Gi"}},
        "podAnnotations": {"prometheus.io/scrape": "false"},
        "podLabels": {"team": "inference"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops",
                         "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": "50%"},
    },
    "serviceAccount": {"create": True, "name": "kvpool-operator",
                       "annotations": {"example.com/role": "operator"}},
}
NAMESPACED: dict[str, Any] = {"operator": {"watchNamespaces": ["team-a", "team-b"]}}
SCENARIOS = {"default": None, "custom": CUSTOM, "namespaced": NAMESPACED}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Object]]:
    """Each scenario rendered once for the module (helm runs are the slow part)."""
    tmp = tmp_path_factory.mktemp("chart")
    return {name: render(tmp, values) for name, values in SCENARIOS.items()}


def operator_container(objects: list[Object]) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def rules_of(objects: list[Object], name: str) -> list[dict[str, Any]]:
    return one(objects, "ClusterRole", name)["rules"]


# --- helm lint, helm template, schema validation of every object ---------------------------

@pytest.mark.parametrize("binary", HELMS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_is_clean(scenario: str, binary: str, tmp_path: Path) -> None:
    values = SCENARIOS[scenario]
    args: list[str | Path] = ["lint", CHART, "--strict"]
    if values is not None:
        args += ["--values", write_values(tmp_path / "values.yaml", values)]
    out = helm(*args, binary=binary)
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm3_renders_what_helm4_renders(
    scenario: str, rendered: dict[str, list[Object]], tmp_path: Path
) -> None:
    assert render(tmp_path, SCENARIOS[scenario], binary="helm3") == rendered[scenario]
    assert render(tmp_path, SCENARIOS[scenario], binary="helm3", include_crds=True) == render(
        tmp_path, SCENARIOS[scenario], include_crds=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_valid(scenario: str, rendered: dict[str, list[Object]]) -> None:
    crds = chart_crds()
    objects = rendered[scenario]
    assert objects
    for obj in objects:
        validate(obj, crds)


def test_crds_render_only_with_include_crds(tmp_path: Path) -> None:
    with_crds = render(tmp_path, include_crds=True)
    crd_names = {crd["metadata"]["name"] for crd in find(with_crds, "CustomResourceDefinition")}
    assert crd_names == {crd["metadata"]["name"] for crd in chart_crds()}
    assert "kvcachepools.kvpool.dev" in crd_names
    assert not find(render(tmp_path), "CustomResourceDefinition")


def test_default_install_objects(rendered: dict[str, list[Object]]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered["default"])
    assert kinds == [
        ("ClusterRole", "kvpool-cluster"),
        ("ClusterRole", "kvpool-pools"),
        ("ClusterRoleBinding", "kvpool-cluster"),
        ("ClusterRoleBinding", "kvpool-pools"),
        ("Deployment", "kvpool"),
        ("PodDisruptionBudget", "kvpool"),
        ("ServiceAccount", "kvpool"),
    ]
    for obj in rendered["default"]:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kvpool"
        if obj["kind"] in {"Deployment", "ServiceAccount", "PodDisruptionBudget"}:
            assert obj["metadata"]["namespace"] == "kvpool-system"


def test_operator_command_line(rendered: dict[str, list[Object]]) -> None:
    default = operator_container(rendered["default"])
    assert default["image"] == "kvpool:0.1.0"
    assert default["args"] == ["operator", "--liveness=http://0.0.0.0:8080/healthz"]
    env = {e["name"]: e for e in default["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["KVPOOL_IMAGE"]["value"] == default["image"]
    assert env["KVPOOL_CLUSTER_DOMAIN"]["value"] == "cluster.local"

    custom = operator_container(rendered["custom"])
    assert custom["image"] == "registry.example/kvpool:1.2.3"
    assert custom["imagePullPolicy"] == "Always"
    assert custom["args"][-2:] == ["--verbose", "--priority=10"]
    assert {"name": "KVPOOL_CLUSTER_DOMAIN", "value": "k8s.example"} in custom["env"]
    assert {"name": "KVPOOL_EXTRA", "value": "1"} in custom["env"]

    namespaced = operator_container(rendered["namespaced"])
    assert [a for a in namespaced["args"] if a.startswith("--namespace=")] == [
        "--namespace=team-a", "--namespace=team-b",
    ]


def test_liveness_probe_targets_the_operator_liveness_endpoint(
    rendered: dict[str, list[Object]],
) -> None:
    for scenario, port in (("default", 8080), ("custom", 9090)):
        container = operator_container(rendered[scenario])
        flag = next(a for a in container["args"] if a.startswith("--liveness="))
        url = re.fullmatch(r"--liveness=http://0\.0\.0\.0:(\d+)(/\S+)", flag)
        assert url and int(url[1]) == port
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in (container["livenessProbe"], container["startupProbe"]):
            assert probe["httpGet"]["path"] == url[2]
            assert ports[probe["httpGet"]["port"]] == port


def test_several_replicas_spread_and_keep_one_up(rendered: dict[str, list[Object]]) -> None:
    deployment = one(rendered["default"], "Deployment")
    assert deployment["spec"]["replicas"] == 2
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    pdb = one(rendered["default"], "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert one(rendered["custom"], "PodDisruptionBudget")["spec"]["maxUnavailable"] == "50%"


def test_single_replica_has_no_disruption_budget(tmp_path: Path) -> None:
    objects = render(tmp_path, {"operator": {"replicas": 1}})
    assert one(objects, "Deployment")["spec"]["replicas"] == 1
    assert not find(objects, "PodDisruptionBudget")
    assert "affinity" not in one(objects, "Deployment")["spec"]["template"]["spec"]


# --- security -------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_operator_runs_unprivileged(scenario: str, rendered: dict[str, list[Object]]) -> None:
    pod = one(rendered[scenario], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert container["resources"]["requests"]["cpu"]
        assert container["resources"]["requests"]["memory"]
        assert container["resources"]["limits"]["memory"]
        # The only writable path is an emptyDir /tmp.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts == {"/tmp": "tmp"}
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]


# --- RBAC -----------------------------------------------------------------------------------

FORBIDDEN_RESOURCES = {"secrets", "pods/exec", "pods/attach", "nodes", "serviceaccounts/token",
                       "clusterroles", "clusterrolebindings", "roles", "rolebindings"}
FORBIDDEN_VERBS = {"escalate", "bind", "impersonate", "deletecollection"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_is_least_privilege(scenario: str, rendered: dict[str, list[Object]]) -> None:
    roles = find(rendered[scenario], "ClusterRole") + find(rendered[scenario], "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
            assert "*" not in rule["apiGroups"]
            if rule["resources"] == ["secrets"]:
                # Create only (the pool's generated TLS Secret): never read one.
                assert rule["verbs"] == ["create"], rule
                continue
            assert not FORBIDDEN_RESOURCES & set(rule["resources"]), rule
            assert not FORBIDDEN_VERBS & set(rule["verbs"]), rule
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule


def test_cluster_wide_rbac(rendered: dict[str, list[Object]]) -> None:
    objects = rendered["default"]
    cluster = {r for rule in rules_of(objects, "kvpool-cluster") for r in rule["resources"]}
    assert cluster == {"customresourcedefinitions", "namespaces", "clusterkopfpeerings"}
    pools = {r for rule in rules_of(objects, "kvpool-pools") for r in rule["resources"]}
    assert "kopfpeerings" not in pools and "kvcachepools" in pools
    for name in ("kvpool-cluster", "kvpool-pools"):
        binding = one(objects, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                      "kind": "ClusterRole", "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kvpool",
                                        "namespace": "kvpool-system"}]
    assert not find(objects, "RoleBinding")


def test_namespaced_rbac_binds_only_the_watched_namespaces(
    rendered: dict[str, list[Object]],
) -> None:
    objects = rendered["namespaced"]
    assert [b["metadata"]["name"] for b in find(objects, "ClusterRoleBinding")] == [
        "kvpool-cluster"
    ]
    bindings = find(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["name"] == "kvpool-pools"
        assert binding["subjects"][0]["namespace"] == "kvpool-system"
    cluster = {r for rule in rules_of(objects, "kvpool-cluster") for r in rule["resources"]}
    assert cluster == {"customresourcedefinitions", "namespaces"}
    pools = {r for rule in rules_of(objects, "kvpool-pools") for r in rule["resources"]}
    assert "kopfpeerings" in pools


def test_existing_service_account_and_no_rbac(tmp_path: Path) -> None:
    objects = render(tmp_path, {"serviceAccount": {"create": False, "name": "ops"},
                                "rbac": {"create": False}})
    assert not find(objects, "ServiceAccount")
    assert not [o for o in objects if o["apiVersion"].startswith("rbac.authorization.k8s.io")]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ops"


# --- values.schema.json ---------------------------------------------------------------------

BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "zero replicas": ({"operator": {"replicas": 0}}, "replicas"),
    "replicas as text": ({"operator": {"replicas": "two"}}, "replicas"),
    "pull policy": ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    "unknown top-level key": ({"operatr": {"replicas": 2}}, "operatr"),
    "unknown operator key": ({"operator": {"replica": 2}}, "replica"),
    "namespace name": ({"operator": {"watchNamespaces": ["Team_A"]}}, "watchNamespaces"),
    "duplicate namespace": ({"operator": {"watchNamespaces": ["a", "a"]}}, "watchNamespaces"),
    "privileged port": ({"operator": {"livenessPort": 80}}, "livenessPort"),
    "verbose as text": ({"operator": {"verbose": "yes"}}, "verbose"),
    "cluster domain": ({"operator": {"clusterDomain": "Cluster Local"}}, "clusterDomain"),
    "memory quantity": ({"operator": {"resources": {"limits": {"memory": "lots"}}}}, "memory"),
    "root user": ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
    "privilege escalation": ({"securityContext": {"allowPrivilegeEscalation": True}},
                             "allowPrivilegeEscalation"),
}


@pytest.mark.parametrize("binary", HELMS)
@pytest.mark.parametrize("case", BAD_VALUES)
def test_values_schema_rejects_bad_values(case: str, binary: str, tmp_path: Path) -> None:
    values, field = BAD_VALUES[case]
    with pytest.raises(HelmError) as excinfo:
        render(tmp_path, values, binary=binary)
    message = str(excinfo.value)
    assert "values don't meet the specifications of the schema" in message
    assert field in message


# --- packaging, NOTES.txt -------------------------------------------------------------------

def test_chart_packages_with_its_crds(tmp_path: Path) -> None:
    out = helm("package", CHART, "--destination", tmp_path)
    (package,) = tmp_path.glob("kvpool-*.tgz")
    assert str(package) in out
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart_meta["apiVersion"] == "v2"  # Helm 3 and Helm 4 both install v2 charts
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
    assert {"kvpool/Chart.yaml", "kvpool/values.yaml", "kvpool/values.schema.json",
            "kvpool/templates/NOTES.txt", "kvpool/crds/kvcachepools.kvpool.dev.yaml",
            "kvpool/crds/clusterkopfpeerings.kopf.dev.yaml"} <= names


def test_notes_tell_how_to_use_the_release(tmp_path: Path) -> None:
    out = helm("install", "demo", CHART, "--dry-run=client", "--namespace", "ops",
               "--values", write_values(tmp_path / "v.yaml", NAMESPACED))
    notes = out.split("NOTES:", 1)[1]
    assert "rollout status deployment/demo-kvpool" in notes
    assert "team-a, team-b" in notes
    assert "kubectl get kvp" in notes


@pytest.mark.parametrize("binary", HELMS)
def test_chart_refuses_clusters_older_than_its_kube_version(binary: str) -> None:
    """CEL validation and the APIs the chart uses need Kubernetes 1.30 (Chart.yaml kubeVersion)."""
    with pytest.raises(HelmError, match="kubeVersion"):
        helm("template", "kvpool", CHART, "--kube-version", "1.29.0", binary=binary)
    helm("template", "kvpool", CHART, "--kube-version", "1.30.0", binary=binary)
