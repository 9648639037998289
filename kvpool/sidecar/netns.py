"""Emulated network links: two network namespaces joined by a veth pair, rate-limited with tc tbf.

The KV transfer between two sidecars is measured over links slower than loopback by
running each sidecar in its own network namespace (``ip netns exec NS ...``); the veth
pair between them carries a token-bucket filter (``tc qdisc ... tbf rate 100mbit``) on both
ends. Everything is made on entry and removed on exit (also after an error)::

    with netns.Link("100mbit") as link:
        argv = [*link.exec_in("a"), "kvpool", "sidecar", "--peer", f"{link.address('a')}:50051"]

A process that cannot be started under ``ip netns exec`` (a ``multiprocessing`` child)
joins a namespace itself with :func:`enter`, before it opens any socket.

Needs root, iproute2 (``ip``, ``tc``) and a kernel with network namespaces and veth;
:func:`unavailable` says why not where they are missing, so that callers skip cleanly.
This kernel has no ``netem``: latency cannot be added, only the rate limited.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import re
import shutil
import subprocess
from types import TracebackType
from typing import Self

SIDES = ("a", "b")

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_BITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class NetnsUnavailable(RuntimeError):
    """Network namespaces, veth or tc cannot be used here (the message says why)."""


_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_SLAVE, _MNT_DETACH = 0x4000, 0x80000, 2


def enter(namespace: str) -> None:
    """Move this process into the named network namespace (``ip netns add``) as ``ip
    netns exec`` does for a new program: the network namespace, then a mount namespace of
    its own whose ``/sys`` shows that namespace's devices (UCX, for one, finds its network
    devices there). Call it first thing in a child process, before any thread starts:
    threads started afterwards inherit both, sockets opened before keep their namespace."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise NetnsUnavailable(f"cannot enter network namespace {namespace}: {what}: "
                                   f"{os.strerror(err)}")

    fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        check(libc.setns(fd, _CLONE_NEWNET), "setns")
    finally:
        os.close(fd)
    check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check(libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None), "mount --make-rslave /")
    check(libc.umount2(b"/sys", _MNT_DETACH), "umount /sys")
    check(libc.mount(namespace.encode(), b"/sys", b"sysfs", 0, None), "mount sysfs")


def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate such as ``100mbit`` or ``1gbit``."""
    match = _RATE.match(rate)
    if not match:
        raise ValueError(f"not a tc rate: {rate!r} (expected e.g. 100mbit, 1gbit)")
    return float(match.group(1)) * _BITS[match.group(2)]


def _run(*argv: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")


def unavailable() -> str | None:
    """Why emulated links cannot be made here, or None when they can (tries one)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    try:
        with Link("1gbit"):
            pass
    except NetnsUnavailable as exc:
        return str(exc)
    return None


class Link:
    """Two namespaces (sides ``a`` and ``b``) joined by a veth pair limited to ``rate``
    in each direction; ``rate=None`` leaves the link unshaped."""

    def __init__(self, rate: str | None, *, burst_s: float = 0.004, latency_ms: int = 50) -> None:
        if rate is not None:
            rate_bits(rate)  # validate early
        self.rate = rate
        self.burst_s = burst_s
        self.latency_ms = latency_ms
        token = f"{os.getpid() % 10000:04d}{random.randrange(16**3):03x}"
        self.namespaces = {side: f"kvpool-{token}-{side}" for side in SIDES}
        self.devices = {side: f"kv{token}{side}" for side in SIDES}  # <= 15 characters
        subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        self.addresses = {"a": f"{subnet}.1", "b": f"{subnet}.2"}
        self._made: list[str] = []

    def exec_in(self, side: str) -> list[str]:
        """Command prefix that runs a program inside the namespace of ``side``."""
        return ["ip", "netns", "exec", self.namespaces[side]]

    def address(self, side: str) -> str:
        """IPv4 address of ``side``'s end of the link."""
        return self.addresses[side]

    def tx_bytes(self, side: str) -> int:
        """Bytes sent so far by ``side``'s end of the link (its veth device's counter)."""
        out = subprocess.run(["ip", "-n", self.namespaces[side], "-j", "-s", "link", "show",
                              "dev", self.devices[side]],
                             capture_output=True, text=True, check=True).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def _create(self) -> None:
        for side in SIDES:
            _run("ip", "netns", "add", self.namespaces[side])
            self._made.append(self.namespaces[side])
        dev_a, dev_b = self.devices["a"], self.devices["b"]
        _run("ip", "link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
        for side in SIDES:
            ns, dev = self.namespaces[side], self.devices[side]
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{self.addresses[side]}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", dev, "up")
            if self.rate is not None:
                self._shape(side, "add", self.rate)

    def _shape(self, side: str, op: str, rate: str) -> None:
        # burst: a few ms of traffic, and at least two 64 KiB GSO segments (a segment larger
        # than the bucket is never sent: the TCP stream stalls, seen after `tc qdisc change`)
        burst = max(int(rate_bits(rate) / 8 * self.burst_s), 2 * (65536 + 1514))
        _run("tc", "-n", self.namespaces[side], "qdisc", op, "dev", self.devices[side], "root",
             "tbf", "rate", rate, "burst", str(burst), "latency", f"{self.latency_ms}ms")

    def set_rate(self, rate: str) -> None:
        """Change the rate of both directions now, traffic flowing or not (a link whose
        bandwidth drops mid-stream)."""
        rate_bits(rate)
        for side in SIDES:
            self._shape(side, "change" if self.rate is not None else "add", rate)
        self.rate = rate

    def _remove(self) -> None:
        # deleting a namespace deletes its end of the veth pair, and with it the other end
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._made.clear()
