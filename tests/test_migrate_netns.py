"""Migrations between two "hosts": network namespaces joined by a veth pair,
each side with its own private bus, back-ends and helper, over TCP and TLS,
with the link cut in pre-copy and in stop-copy.

Slow (each takes seconds), and skipped with the reason where the machine
cannot make namespaces (not root, no ``ip``).
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from dbus_vmstate2.privatebus import PrivateBus

from . import netns
from .migration import reap_commands  # noqa: F401 (the fixture)
from .migration import Incoming, make_tls, run, start
from .test_live_save import events
from .test_migrate import assert_moved, assert_source_serves_on, pair

pytestmark = [pytest.mark.slow, pytest.mark.skipif((why := netns.why_not()) is not None, reason=str(why))]


@pytest.fixture
def hosts():
    made = netns.make()
    try:
        yield made
    finally:
        netns.remove(made)


@pytest.fixture
def dest_bus():
    with PrivateBus() as bus:
        yield bus.address


def link_failure(err: str, peer: str) -> bool:
    """A cut link, as the source reports it: our I/O timeout, the kernel's
    TCP_USER_TIMEOUT (set from it) ending the connection first, or the
    kernel's own word that the link's route is gone (ENETUNREACH, EHOSTUNREACH:
    the source's end of the link went down too)."""
    return f"tcp:{peer}:4444" in err and any(
        words in err
        for words in ("took nothing for 3 s (the I/O timeout)", "Connection timed out", "or the link failed",
                      "Network is unreachable", "No route to host")  # fmt: skip
    )


@pytest.mark.parametrize("secure", ["tls", "plain"])
def test_migrate_between_two_hosts_carries_the_state_at_quiesce(hosts, bus_address, dest_bus, memstate, tmp_path, secure):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="64M", dirty="8M")
    if secure == "tls":
        server, client = make_tls(tmp_path / "pki", [hosts.dst_addr])
        dest_opts, src_opts = ["--tls-creds", str(server)], ["--tls-creds", str(client)]
    else:
        dest_opts = src_opts = ["--insecure-plain-tcp"]
    incoming = Incoming(dest_bus, f"tcp:{hosts.dst_addr}:4444", "--json", *dest_opts, prefix=hosts.exec(hosts.dst))
    assert incoming.address == f"tcp:{hosts.dst_addr}:4444"
    done = run(bus_address, "migrate", incoming.address, "--json", *src_opts, prefix=hosts.exec(hosts.src))
    assert done.returncode == 0, done.stderr
    code, out, err = incoming.finish()
    assert code == 0, err
    summary = json.loads(done.stdout)
    assert summary["downtime"] <= 1.0 and summary["switch_reason"] == "converged"
    assert json.loads(out)["source"].startswith(f"tcp:{hosts.dst_addr}:4444 (from {hosts.src_addr}:")
    assert_moved(reports)


def test_the_link_cut_in_pre_copy_fails_both_sides_within_the_timeout(hosts, bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="64M", dirty="64M")
    hosts.cap("40mbit")  # 64 MiB takes over 13 s: the cut comes in the initial data
    incoming = Incoming(dest_bus, f"tcp:{hosts.dst_addr}:4444", "--insecure-plain-tcp", "--io-timeout", "3",
                        prefix=hosts.exec(hosts.dst))  # fmt: skip
    migrating = start(bus_address, "migrate", incoming.address, "--insecure-plain-tcp", "--io-timeout", "3",
                      prefix=hosts.exec(hosts.src))  # fmt: skip
    time.sleep(2.0)
    hosts.link(up=False)
    cut = time.monotonic()
    _, err = migrating.communicate(timeout=60)
    took = time.monotonic() - cut
    assert migrating.returncode == 4, err
    assert link_failure(err, hosts.dst_addr)
    assert took < 3 + 5
    code, _, err = incoming.finish()
    # With the link down, the destination's next PROGRESS report finds no
    # route, unless its I/O timeout comes first: either says the link failed.
    assert code == 4 and ("for 3 s (the I/O timeout)" in err or "Network is unreachable" in err), err
    assert_source_serves_on(bus_address, reports)
    for _, (src, _) in reports.items():
        assert events(src, "quiesced") == []  # it never stopped


def test_the_link_cut_in_stop_copy_resumes_the_source_with_its_state(hosts, bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="64M", dirty="1M")
    hosts.cap("40mbit")
    incoming = Incoming(dest_bus, f"tcp:{hosts.dst_addr}:4444", "--insecure-plain-tcp", "--io-timeout", "3",
                        prefix=hosts.exec(hosts.dst))  # fmt: skip
    migrating = start(bus_address, "migrate", incoming.address, "--insecure-plain-tcp", "--io-timeout", "3",
                      prefix=hosts.exec(hosts.src))  # fmt: skip
    time.sleep(2.0)
    migrating.send_signal(signal.SIGUSR1)  # switch over with most of the 64 MiB still to send
    deadline = time.monotonic() + 10
    while not events(reports["fs"][0], "quiesced"):
        assert time.monotonic() < deadline, "the source did not quiesce"
        time.sleep(0.05)
    hosts.link(up=False)
    _, err = migrating.communicate(timeout=60)
    assert migrating.returncode == 4, err
    assert link_failure(err, hosts.dst_addr)
    code, _, _ = incoming.finish()
    assert code == 4
    # Quiesced once, then resumed with that state: serving on, nothing loaded at the destination.
    assert_source_serves_on(bus_address, reports)
    assert len(events(reports["fs"][0], "quiesced")) == 1
