"""NIXL across an emulated link: the source and the reader each in a network namespace of
their own (joined by :func:`kvpool.sidecar.netns.enter` before their agents start), UCX on
TCP over the veth pair between them, as ``kvpool bench transfer`` runs its ``link_1gbit``
NIXL rows."""

from __future__ import annotations

import pytest

from kvpool.sidecar import bench_transfer, netns

pytestmark = pytest.mark.netns

TOKENS = 64


@pytest.fixture
def link():
    pytest.importorskip("nixl", reason="NIXL is installed by make install")
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"emulated links cannot be made here: {reason}")
    with netns.Link("1gbit") as made:
        yield made


def test_nixl_reads_cross_the_namespace_link(link):
    """Real KV, published raw by the source, read by the other namespace and decoded (each
    READ's CRC checked); its bytes left the source's namespace over the link (not through
    shared memory, which UCX would use between two local processes)."""
    before = link.tx_bytes("a")
    seconds, raw = bench_transfer.nixl_stream_over(link, TOKENS, "raw")
    sent = link.tx_bytes("a") - before
    assert seconds > 0 and raw > 0
    # the run's raw payloads (and the warm-up's) crossed the veth pair
    assert sent >= raw, f"only {sent} bytes crossed the link for {raw} raw bytes"
