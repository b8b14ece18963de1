"""Hosts on one machine: M network namespaces joined by a bridge, for multi-host tests and
benchmarks (not part of the library).

    with Hosts(2, rate_mbit=10) as hosts:
        hosts.run(0, ["ip", "addr"])           # runs inside host 0's namespace
        hosts.address(1)                       # '198.18.0.2'

Layout: one namespace holds a bridge (no address, no forwarding); each host is a namespace with
`lo` and one veth interface `eth0` whose other end is a port of that bridge. Addresses come from
198.18.0.0/15 (RFC 2544, reserved for network benchmarks); the only route in a host is its own
/24, so nothing can leave the bridge. Every interface is created inside a namespace made here:
nothing in the caller's namespace is touched. With `rate_mbit`, each host's link is capped in
both directions (`tc` tbf or htb on `eth0` and on its bridge port). This machine's kernel has no
netem, so there is no delay or loss emulation: only rate limits.

Teardown (on leaving the context, on failure, and at interpreter exit) kills what still runs in
the namespaces and deletes them, which removes their interfaces. Needs root and iproute2.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from typing import Any

NETWORK = ipaddress.ip_network("198.18.0.0/15")
_SUBNET = ipaddress.ip_network("198.18.0.0/24")
_LIVE: set[Hosts] = set()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str:
    """Why namespaces cannot be made here ('' when they can): tested by making one."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"dlprobe{uuid.uuid4().hex[:8]}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


def has_netem() -> bool:
    """True when the kernel offers netem (delay/loss); tried on a throwaway namespace."""
    probe = f"dlprobe{uuid.uuid4().hex[:8]}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    try:
        res = subprocess.run(
            ["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
        )
        return res.returncode == 0
    finally:
        _ip("netns", "del", probe, check=False)


class Hosts:
    """M hosts (network namespaces) on one bridge; a context manager that always cleans up."""

    def __init__(self, m: int, rate_mbit: float | None = None, shaper: str = "htb") -> None:
        if not 1 <= m <= 250:
            raise ValueError("between 1 and 250 hosts")
        if shaper not in ("tbf", "htb"):
            raise ValueError("shaper is tbf or htb")
        self.m, self.rate_mbit, self.shaper = m, rate_mbit, shaper
        self.prefix = f"dl{uuid.uuid4().hex[:10]}"  # unique: parallel tests never collide
        self.bridge_ns = f"{self.prefix}-br"
        self.namespaces = [f"{self.prefix}-h{i}" for i in range(m)]
        self._made: list[str] = []

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Hosts:
        _LIVE.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def _build(self) -> None:
        self._netns(self.bridge_ns)
        br = ["-n", self.bridge_ns]
        _ip(*br, "link", "add", "br0", "type", "bridge")
        _ip(*br, "link", "set", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            self._netns(ns)
            # both ends are born in namespaces of ours: eth0 in the host, p<i> at the bridge
            _ip(
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                self.bridge_ns,
            )
            _ip(*br, "link", "set", f"p{i}", "master", "br0")
            _ip(*br, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/{_SUBNET.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.rate_mbit:
                self._cap(ns, "eth0")  # the host's uplink
                self._cap(self.bridge_ns, f"p{i}")  # and its downlink

    def _cap(self, ns: str, dev: str) -> None:
        rate = f"{self.rate_mbit}mbit"
        # a burst of at least 1/50 s of traffic (and a few frames), so the cap is the rate
        burst = str(max(16_000, int(self.rate_mbit * 1e6 / 8 / 50)))
        tc = ["tc", "-n", ns]
        if self.shaper == "tbf":
            cmd = [*tc, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate]
            subprocess.run([*cmd, "burst", burst, "latency", "200ms"], check=True)
            return
        subprocess.run(
            [*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"],
            check=True,
        )
        subprocess.run(
            [
                *tc,
                "class",
                "add",
                "dev",
                dev,
                "parent",
                "1:",
                "classid",
                "1:10",
                "htb",
                "rate",
                rate,
                "burst",
                burst,
            ],
            check=True,
        )

    def close(self) -> None:
        """Kill what still runs in our namespaces, then delete them (their links go too)."""
        for ns in self._made:
            self._kill(ns)
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()
        _LIVE.discard(self)

    def _kill(self, ns: str, sig: int = signal.SIGKILL) -> None:
        res = _ip("netns", "pids", ns, check=False)
        for pid in res.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), sig)

    def link(self, i: int, up: bool) -> None:
        """Cut (or restore) host i's cable: its bridge port goes down, its own address and
        routes stay, so to host i it looks like a link that stopped carrying traffic."""
        _ip("-n", self.bridge_ns, "link", "set", f"p{i}", "up" if up else "down")

    def kill(self, i: int) -> None:
        """SIGKILL every process in host i's namespace (a machine that dies)."""
        self._kill(self.namespaces[i])

    # ------------------------------------------------------------------ use

    def address(self, i: int) -> str:
        return str(_SUBNET.network_address + 1 + i)

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """`argv` as run inside host i (same files and environment, host i's network)."""
        return ["ip", "netns", "exec", self.namespaces[i], *argv]

    def popen(self, i: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self.command(i, argv), **kw)

    def run(self, i: int, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(i, argv), **kw)

    def counters(self, i: int) -> dict[str, int]:
        """Host i's eth0 byte and packet counters from the kernel (what really crossed)."""
        res = _ip("-n", self.namespaces[i], "-s", "-j", "link", "show", "dev", "eth0")
        stats = json.loads(res.stdout)[0]["stats64"]
        return {
            "tx_bytes": int(stats["tx"]["bytes"]),
            "rx_bytes": int(stats["rx"]["bytes"]),
            "tx_packets": int(stats["tx"]["packets"]),
            "rx_packets": int(stats["rx"]["packets"]),
        }

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no process is left in any host (after the runs were told to stop)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(
                _ip("netns", "pids", ns, check=False).stdout.split() for ns in self.namespaces
            ):
                return
            time.sleep(0.1)


@atexit.register
def _clean_all() -> None:
    for hosts in list(_LIVE):
        hosts.close()
