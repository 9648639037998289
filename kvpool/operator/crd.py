"""The CustomResourceDefinitions, generated from :mod:`kvpool.operator.api` (``kvpool crd``).

One source of truth: ``crds/*.yaml`` in the repository (and the Helm chart's CRDs) are
written by ``make crds`` (``kvpool crd --write crds``) and a test checks they equal what
this module generates. Besides ``kvcachepools.kvpool.dev`` it emits kopf's peering CRDs,
which the operator uses to run several replicas safely (one active, the others paused).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

import yaml

from kvpool.operator import api, schema

PEERING_GROUP = "kopf.dev"
PEERING_NAME = "kvpool"
"""The kopf peering object the operator's replicas share (ClusterKopfPeering or KopfPeering)."""

LABELS = {"app.kubernetes.io/name": "kvpool", "app.kubernetes.io/part-of": "kvpool"}


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Prefill", "type": "string", "jsonPath": ".status.prefill.readiness",
         "description": "Prefill pods ready/desired"},
        {"name": "Decode", "type": "string", "jsonPath": ".status.decode.readiness",
         "description": "Decode pods ready/desired"},
        {"name": "Transport", "type": "string", "jsonPath": ".spec.transfer.transport"},
        {"name": "Codec", "type": "string", "jsonPath": ".spec.transfer.codec"},
        {"name": "Ready", "type": "string",
         "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Transfers", "type": "string",
         "jsonPath": '.status.conditions[?(@.type=="TransferHealthy")].reason',
         "description": "TransferHealthy's reason: TransfersSucceeding, TransfersFailing, ..."},
        {"name": "Saved", "type": "integer", "jsonPath": ".status.transfer.bytesSaved",
         "description": "Bytes compression kept off the wire, recent window", "priority": 1},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.routerEndpoint",
         "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def kvcachepool_crd() -> dict[str, Any]:
    """The ``kvcachepools.kvpool.dev`` CRD manifest, as a dict."""
    root = {
        "type": "object",
        "description": "A pool of prefill and decode vLLM workers that pass each other "
        "compressed KV caches through kvpool sidecars, behind one router.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": schema.openapi(api.KVCachePoolSpec),
            "status": schema.openapi(api.KVCachePoolStatus),
        },
        "required": ["spec"],
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {api.MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {api.MAX_NAME_LENGTH} characters "
                "(the children's names add suffixes to it)",
            }
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}", "labels": dict(LABELS)},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": list(api.CATEGORIES),
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        # The one scale subresource drives decode; see kvpool.operator.api.
                        "scale": {
                            "specReplicasPath": ".spec.decode.replicas",
                            "statusReplicasPath": ".status.decode.replicas",
                            "labelSelectorPath": ".status.decode.selector",
                        },
                    },
                    "additionalPrinterColumns": _printer_columns(),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def _peering_crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
    # The same shape kopf documents for its peering resources (docs/peering.rst).
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{PEERING_GROUP}", "labels": dict(LABELS)},
        "spec": {
            "group": PEERING_GROUP,
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": plural[:-1]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def peering_crds() -> list[dict[str, Any]]:
    """kopf's ClusterKopfPeering and KopfPeering CRDs (needed for several operator replicas)."""
    return [
        _peering_crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
        _peering_crd("KopfPeering", "kopfpeerings", "Namespaced"),
    ]


def peering_object(namespace: str | None = None) -> dict[str, Any]:
    """The peering object the replicas meet in: cluster-wide, or in ``namespace``."""
    if namespace is None:
        return {"apiVersion": f"{PEERING_GROUP}/v1", "kind": "ClusterKopfPeering",
                "metadata": {"name": PEERING_NAME, "labels": dict(LABELS)}}
    return {"apiVersion": f"{PEERING_GROUP}/v1", "kind": "KopfPeering",
            "metadata": {"name": PEERING_NAME, "namespace": namespace, "labels": dict(LABELS)}}


def all_crds() -> list[dict[str, Any]]:
    return [kvcachepool_crd(), *peering_crds()]


def to_yaml(doc: dict[str, Any]) -> str:
    """Stable YAML: keys in definition order, long strings unwrapped."""
    text: str = yaml.safe_dump(doc, sort_keys=False, width=1000, allow_unicode=True)
    return text


def files() -> dict[str, str]:
    """File name → YAML text of every CRD, as ``crds/`` holds them."""
    return {f"{crd['metadata']['name']}.yaml": to_yaml(crd) for crd in all_crds()}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true",
                        help="also print kopf's peering CRDs (multi-document YAML)")
    parser.add_argument("--write", metavar="DIR", type=pathlib.Path,
                        help="write one file per CRD into DIR instead of printing")
    parser.add_argument("--check", metavar="DIR", type=pathlib.Path,
                        help="exit 1 if DIR's CRD files differ from the generated ones")


def run(args: argparse.Namespace) -> int:
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        for name, text in files().items():
            (args.write / name).write_text(text)
            print(f"wrote {args.write / name}", file=sys.stderr)
        return 0
    if args.check:
        stale = [name for name, text in files().items()
                 if not (args.check / name).is_file() or (args.check / name).read_text() != text]
        for name in stale:
            print(f"{args.check / name} is out of date: run `make crds`", file=sys.stderr)
        return 1 if stale else 0
    docs = all_crds() if args.all else [kvcachepool_crd()]
    sys.stdout.write("---\n".join(to_yaml(d) for d in docs))
    return 0
