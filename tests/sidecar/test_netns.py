"""kvpool.sidecar.netns: two namespaces, a veth pair, and a tbf rate that really holds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from kvpool.sidecar import netns

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module", autouse=True)
def _need_netns() -> None:
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"emulated links cannot be made here: {reason}")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_rate_parsing() -> None:
    assert netns.rate_bits("100mbit") == 100e6
    assert netns.rate_bits("1gbit") == 1e9
    with pytest.raises(ValueError, match="not a tc rate"):
        netns.rate_bits("fast")


def _throughput_bits(link: netns.Link, megabytes: int) -> float:
    """Send ``megabytes`` from side a to side b over TCP; bits per second received."""
    server = textwrap.dedent(f"""
        import socket, time
        s = socket.create_server(({link.address("b")!r}, 5201))
        print("listening", flush=True)
        c, _ = s.accept()
        buf = bytearray(1 << 20); n = 0; t = None
        while True:
            k = c.recv_into(buf)
            if not k: break
            if t is None: t = time.perf_counter()
            n += k
        print(n * 8 / (time.perf_counter() - t), flush=True)
    """)
    client = textwrap.dedent(f"""
        import socket
        c = socket.create_connection(({link.address("b")!r}, 5201))
        c.sendall(bytes({megabytes} << 20)); c.close()
    """)
    receiver = subprocess.Popen([*link.exec_in("b"), sys.executable, "-c", server],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "listening"
        subprocess.run([*link.exec_in("a"), sys.executable, "-c", client], check=True, timeout=120)
        return float(receiver.stdout.readline())
    finally:
        receiver.kill()
        receiver.wait()


def test_link_is_made_shaped_and_removed() -> None:
    before = _namespaces()
    with netns.Link("100mbit") as link:
        assert set(link.namespaces.values()) <= _namespaces()
        qdisc = subprocess.run(["tc", "-n", link.namespaces["a"], "qdisc", "show"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "tbf" in qdisc and "100Mbit" in qdisc
        started = time.perf_counter()
        rate = _throughput_bits(link, 12)
        assert time.perf_counter() - started < 30
        # TCP over a 100 Mbit/s token bucket: between 80% and 105% of the rate
        assert 80e6 < rate < 105e6, rate
    assert _namespaces() == before


def test_failure_midway_removes_what_was_made() -> None:
    before = _namespaces()
    link = netns.Link("1gbit")
    link.devices["b"] = "x" * 20  # an interface name the kernel refuses
    with pytest.raises(netns.NetnsUnavailable, match="failed"), link:
        pass
    assert _namespaces() == before
