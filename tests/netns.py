"""Two "hosts" on one machine: network namespaces joined by a veth pair.

Used by the slow migration tests and by benchmarks/bench_migrate.py. Needs
root (CAP_NET_ADMIN) and the ``ip`` command; :func:`why_not` says why the
machine cannot make them, for a skip.  Only the addresses made here are ever
used; the namespaces are deleted on exit, even after a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def why_not() -> str | None:
    """None if namespaces and veth pairs can be made here, else the reason."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN)"
    name = f"vm2probe{secrets.token_hex(3)}"
    done = _ip("netns", "add", name, check=False)
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip()}"
    try:
        done = _ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if done.returncode != 0:
            return f"a veth pair cannot be made: {done.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


@dataclass
class Hosts:
    """Namespaces ``src`` and ``dst``, ``src_addr`` and ``dst_addr`` on a veth link."""

    src: str
    dst: str
    src_dev: str
    dst_dev: str
    src_addr: str
    dst_addr: str

    def exec(self, ns: str) -> list[str]:
        """The prefix that runs a command inside ``ns``."""
        return ["ip", "netns", "exec", ns]

    def link(self, up: bool) -> None:
        """Cut (or restore) the link, on both ends."""
        for ns, dev in ((self.src, self.src_dev), (self.dst, self.dst_dev)):
            _ip("-n", ns, "link", "set", dev, "up" if up else "down")

    def cap(self, rate: str, burst: str = "1mb", latency: str = "50ms") -> None:
        """Cap both directions with tbf (netem is not available everywhere)."""
        for ns, dev in ((self.src, self.src_dev), (self.dst, self.dst_dev)):
            _ip("-n", ns, "link", "set", dev, "mtu", "1500")
            subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                            "burst", burst, "latency", latency], check=True, capture_output=True, timeout=30)  # fmt: skip


def make() -> Hosts:
    """Make the two namespaces and the link (10.231.N.1 and .2); :func:`remove` them after."""
    tag = secrets.token_hex(3)
    subnet = 1 + int(tag[:2], 16) % 250
    hosts = Hosts(f"vm2src{tag}", f"vm2dst{tag}", f"vs{tag}", f"vd{tag}", f"10.231.{subnet}.1", f"10.231.{subnet}.2")
    try:
        _ip("netns", "add", hosts.src)
        _ip("netns", "add", hosts.dst)
        _ip("link", "add", hosts.src_dev, "netns", hosts.src, "type", "veth", "peer", "name", hosts.dst_dev, "netns", hosts.dst)
        for ns, dev, addr in ((hosts.src, hosts.src_dev, hosts.src_addr), (hosts.dst, hosts.dst_dev, hosts.dst_addr)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except BaseException:
        remove(hosts)
        raise
    return hosts


def remove(hosts: Hosts) -> None:
    """Delete both namespaces (and so the link); never raises."""
    for ns in (hosts.src, hosts.dst):
        _ip("netns", "del", ns, check=False)
