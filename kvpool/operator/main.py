"""``kvpool operator``: run the KVCachePool operator (kopf) in the foreground.

Cluster-wide by default, or limited to ``--namespace`` (repeatable). Several replicas
are safe: they meet in a kopf peering object (created when absent), the one with the
highest priority acts and the others pause until it is gone (``--standalone`` turns
peering off for a single replica). Liveness: ``GET /healthz`` on ``--liveness``.
"""

from __future__ import annotations

import argparse
import logging
import secrets
from typing import Any

import kopf

from kvpool.operator import api, crd, handlers, kube, validation
from kvpool.operator.settings import OperatorSettings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                        help="watch only this namespace (repeatable); default: all")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", metavar="URL",
                        help="liveness endpoint (default: %(default)s); '' disables it")
    parser.add_argument("--standalone", action="store_true",
                        help="no peering: for exactly one replica")
    parser.add_argument("--priority", type=int, default=None,
                        help="peering priority (default: random, so that replicas differ)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


class _QuietChildEvents(logging.Filter):
    """Drop kopf's "Handler '<kind>_drift' succeeded" lines (one per child event) and
    "Timer 'transfer_health' succeeded" (one per pool and interval): no news."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ((message.startswith("Handler '") and "_drift' succeeded" in message)
                    or message == "Timer 'transfer_health' succeeded.")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(_QuietChildEvents())
    validation.warm_up()
    op = OperatorSettings.from_env()
    namespaces = list(args.namespace) or None
    client = kube.Client(kube.load_config(), op.apply.request_timeout_s)
    if not args.standalone:
        handlers.ensure_peering(client, namespaces)

    kopf.timer(api.GROUP, api.VERSION, api.PLURAL, id="transfer_health",
               interval=op.transfer_health_interval_s,
               initial_delay=op.transfer_health_interval_s)(handlers.transfer_health)

    @kopf.on.startup()
    def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        handlers.configure(settings, op)

    priority = args.priority if args.priority is not None else secrets.randbelow(2**31 - 1) + 1
    kopf.run(
        clusterwide=namespaces is None,
        namespaces=namespaces or (),
        standalone=args.standalone,
        peering_name=None if args.standalone else crd.PEERING_NAME,
        priority=priority,
        liveness_endpoint=args.liveness or None,
        memo=handlers.Memo(settings=op, client=client),
    )
    return 0


