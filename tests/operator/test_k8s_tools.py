"""kvpool.k8s_tools: helm and kubectl extracted from the dev extra's wheels, and runnable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kvpool import k8s_tools


def version(path: Path, *args: str) -> str:
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=60,
                          check=True).stdout


def test_extracts_helm_4_and_kubectl_on_first_use(tmp_path: Path) -> None:
    helm = k8s_tools.tool("helm", tmp_path)
    assert helm == tmp_path / "helm" and helm.stat().st_mode & 0o111
    assert version(helm, "version", "--short").startswith("v4.")
    kubectl = k8s_tools.tool("kubectl", tmp_path)
    assert "Client Version: v1.37" in version(kubectl, "version", "--client")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["helm", "kubectl"]  # no temp left
    mtime = helm.stat().st_mtime_ns
    assert k8s_tools.tool("helm", tmp_path) == helm and helm.stat().st_mtime_ns == mtime


def test_helm3_comes_from_its_own_package(tmp_path: Path) -> None:
    assert version(k8s_tools.tool("helm3", tmp_path), "version", "--short").startswith("v3.")


def test_unknown_tool_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tool 'kind'; known: helm, kubectl, helm3"):
        k8s_tools.tool("kind", tmp_path)
