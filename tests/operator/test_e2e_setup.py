"""The e2e/ setup, checked without a cluster: the kind configs, cluster.sh, and that the
image names and tags it builds are the ones the chart and the example pools use."""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest
import yaml

from tests.operator.chart import CHART, EXAMPLES, ROOT

E2E = ROOT / "e2e"
SCRIPT = E2E / "cluster.sh"


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# ids are not the bare flavour: an id "gpu" would count as the gpu marker (tests/conftest.py).
@pytest.mark.parametrize("flavour", ["cpu", "gpu"], ids=["kind-cpu", "kind-gpu"])
def test_kind_configs(flavour: str) -> None:
    config = yaml.safe_load((E2E / f"kind-{flavour}.yaml").read_text())
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    assert config["name"] == f"kvpool-{flavour}"
    roles = [node["role"] for node in config["nodes"]]
    assert roles.count("control-plane") == 1 and roles.count("worker") >= 2
    gpu_nodes = [n for n in config["nodes"] if n.get("labels", {}).get("nvidia.com/gpu.present")]
    if flavour == "cpu":
        assert not gpu_nodes and not any("extraMounts" in n for n in config["nodes"])
        return
    assert gpu_nodes
    for node in gpu_nodes:
        # The NVIDIA container runtime on the host injects the GPUs named by these mounts.
        mounts = [m for m in node["extraMounts"] if m["hostPath"] == "/dev/null"]
        assert mounts and all(
            re.fullmatch(r"/var/run/nvidia-container-devices/(all|\d+|cdi/.+/\w+)",
                         m["containerPath"]) for m in mounts)


def test_cluster_script_parses_and_refuses_bad_arguments() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    bad = subprocess.run(["bash", str(SCRIPT), "up", "tpu"], capture_output=True, text=True,
                         timeout=30, check=False)
    assert bad.returncode == 2 and "usage:" in bad.stderr


def test_images_match_the_chart_and_the_examples() -> None:
    """cluster.sh builds kvpool:<version> and the worker images the example pools name."""
    version = project_version()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version  # the chart's default image tag
    assert yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"] == "kvpool"
    script = SCRIPT.read_text()
    assert 'docker build -t "kvpool:$tag" .' in script
    assert "--target cpu-worker" in script
    for example, image in (("pool.yaml", "kvpool-worker"), ("pool-cpu.yaml", "kvpool-worker-cpu")):
        assert f"worker_image={image}:$tag" in script
        assert yaml.safe_load((EXAMPLES / example).read_text())["spec"]["image"] == (
            f"{image}:{version}")
    for path in re.findall(r"(?:examples|e2e)/[\w.-]+\.yaml", script):
        assert (ROOT / path).is_file(), path
    assert "kind-$flavour.yaml" in script
