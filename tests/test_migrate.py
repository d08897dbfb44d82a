"""``migrate`` and ``incoming`` over unix sockets and loopback TCP: the real
command on both sides, each with its own private bus and memstate back-ends.

memstate keeps dirtying (``--dirty-rate``) and reports the digest of what it
froze at quiesce (source) and of what it loaded (destination): a migration
is right when they are equal; a failed one leaves the source serving with
the state it had, and the destination with none loaded.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from dbus_vmstate2.privatebus import PrivateBus

from .migration import reap_commands  # noqa: F401 (the fixture)
from .migration import COMMAND, CorruptingProxy, Incoming, make_tls, run, start
from .test_live_save import events
from .test_vmm import backend_state


@pytest.fixture
def dest_bus():
    with PrivateBus() as bus:
        yield bus.address


def pair(memstate, bus_address, dest_bus, tmp_path: Path, size: str = "16M", dirty: str = "2M"):
    """A source with two dirtying back-ends and a destination with their counterparts."""
    reports = {}
    for backend_id, seed in (("fs", "1"), ("net", "2")):
        reports[backend_id] = (tmp_path / f"{backend_id}.src", tmp_path / f"{backend_id}.dst")
        memstate(backend_id, "--size", size if backend_id == "fs" else "2M", "--seed", seed, "--dirty-rate", dirty,
                 "--report", str(reports[backend_id][0]))  # fmt: skip
        memstate(backend_id, "--report", str(reports[backend_id][1]), address=dest_bus)
    return reports


def assert_moved(reports) -> None:
    for backend_id, (src, dst) in reports.items():
        [quiesced] = events(src, "quiesced")
        [loaded] = events(dst, "loaded")
        assert loaded["digest"] == quiesced["digest"], backend_id


def assert_source_serves_on(bus_address, reports, dest_reports_empty: bool = True) -> None:
    result = run(bus_address, "status", "--json")
    assert [b["state"] for b in json.loads(result.stdout)] == ["running", "running"]
    for _, (_, dst) in reports.items():
        if dest_reports_empty:
            assert events(dst, "loaded") == []


def test_migrate_over_a_unix_socket_moves_the_state_at_quiesce(bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path)
    incoming = Incoming(dest_bus, f"unix:{tmp_path / 'mig.sock'}", "--json")
    done = run(bus_address, "migrate", incoming.address, "--json", "--downtime-limit", "500")
    assert done.returncode == 0, done.stderr
    code, out, err = incoming.finish()
    assert code == 0, err
    summary = json.loads(done.stdout)
    assert summary["command"] == "migrate" and summary["switch_reason"] == "converged"
    assert summary["downtime"] is not None and summary["stop_copy_time"] <= summary["downtime"]
    assert summary["ack_wait"] is not None and summary["wire_bytes"] > 18 << 20
    assert summary["rounds"] >= 0 and summary["stream_bytes"] > 18 << 20
    received = json.loads(out)
    assert [b["id"] for b in received["backends"]] == ["fs", "net"]
    assert_moved(reports)
    # The handover is complete: the source stays stopped, the destination serves.
    states = {b["id"]: b["state"] for b in json.loads(run(bus_address, "status", "--json").stdout)}
    assert states == {"fs": "stopped", "net": "stopped"}
    states = {b["id"]: b["state"] for b in json.loads(run(dest_bus, "status", "--json").stdout)}
    assert states == {"fs": "running", "net": "running"}


def test_migrate_over_loopback_tcp_asks_for_tls_or_an_explicit_plain_link(bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="4M")
    refused = run(dest_bus, "incoming", "tcp:127.0.0.1:0")
    assert refused.returncode == 2
    assert "needs --tls-creds DIR" in refused.stderr and "--insecure-plain-tcp" in refused.stderr
    incoming = Incoming(dest_bus, "tcp:127.0.0.1:0", "--insecure-plain-tcp")
    assert incoming.address.startswith("tcp:127.0.0.1:") and not incoming.address.endswith(":0")
    refused = run(bus_address, "migrate", incoming.address)
    assert refused.returncode == 2 and "needs --tls-creds DIR" in refused.stderr
    done = run(bus_address, "migrate", incoming.address, "--insecure-plain-tcp")
    assert done.returncode == 0, done.stderr
    assert "migrated 2 back-end(s) to tcp:127.0.0.1:" in done.stdout and "the back-ends here are stopped" in done.stdout
    code, out, err = incoming.finish()
    assert code == 0, err
    assert "received 2 back-end(s)" in out and "every back-end committed" in out
    assert_moved(reports)


def test_migrate_over_ipv6_loopback(bus_address, dest_bus, memstate, tmp_path):
    if not socket.has_ipv6 or not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1)")
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="4M")
    incoming = Incoming(dest_bus, "tcp:[::1]:0", "--insecure-plain-tcp")
    assert incoming.address.startswith("tcp:[::1]:")
    done = run(bus_address, "migrate", incoming.address, "--insecure-plain-tcp")
    assert done.returncode == 0, done.stderr
    assert incoming.finish()[0] == 0
    assert_moved(reports)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_migrate_over_tls_each_side_verifying_the_other(bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="4M")
    server, client = make_tls(tmp_path / "pki", ["127.0.0.1", "localhost"])
    incoming = Incoming(dest_bus, "tcp:127.0.0.1:0", "--tls-creds", str(server))
    done = run(bus_address, "migrate", incoming.address.replace("127.0.0.1", "localhost"), "--tls-creds", str(client))
    assert done.returncode == 0, done.stderr
    assert incoming.finish()[0] == 0
    assert_moved(reports)


def test_the_wrong_certificate_fails_both_sides_clearly_and_the_source_runs_on(bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="4M")
    server, _ = make_tls(tmp_path / "pki", ["127.0.0.1"])
    _, stranger = make_tls(tmp_path / "other", ["127.0.0.1"], ca_name="another-ca")
    incoming = Incoming(dest_bus, "tcp:127.0.0.1:0", "--tls-creds", str(server))
    started = time.monotonic()
    done = run(bus_address, "migrate", incoming.address, "--tls-creds", str(stranger))
    assert done.returncode == 4, done.stderr
    assert "cannot connect to tcp:127.0.0.1:" in done.stderr and "TLS" in done.stderr
    assert "the peer's certificate does not verify: self-signed certificate in certificate chain" in done.stderr
    code, _, err = incoming.finish()
    assert code == 4 and "the TLS handshake with the source on tcp:127.0.0.1:" in err
    assert time.monotonic() - started < 30
    assert_source_serves_on(bus_address, reports)
    # A name the destination's certificate does not carry is refused too.
    incoming = Incoming(dest_bus, "tcp:127.0.0.1:0", "--tls-creds", str(server))
    done = run(bus_address, "migrate", incoming.address, "--tls-creds", str(server.parent / "client"),
               "--tls-hostname", "elsewhere.example")  # fmt: skip
    assert done.returncode == 4 and "not valid for 'elsewhere.example'" in done.stderr, done.stderr
    assert incoming.finish()[0] == 4
    assert_source_serves_on(bus_address, reports)


def test_a_destination_without_the_same_backends_refuses_before_anything_starts(bus_address, dest_bus, memstate, tmp_path):
    memstate("fs", "--size", "1M", "--seed", "1")
    memstate("net", "--size", "1M", "--seed", "2")
    memstate("fs", address=dest_bus)
    memstate("gpu", address=dest_bus)
    incoming = Incoming(dest_bus, f"unix:{tmp_path / 'mig.sock'}")
    done = run(bus_address, "migrate", incoming.address)
    assert done.returncode == 4
    assert "the destination (unix:" in done.stderr and "refused" in done.stderr
    assert "has no back-end 'net'" in done.stderr and "sends nothing for 'gpu'" in done.stderr
    code, _, err = incoming.finish()
    assert code == 1 and "has no back-end 'net'" in err
    states = [b["state"] for b in json.loads(run(bus_address, "status", "--json").stdout)]
    assert states == ["running", "running"]
    assert [b["transfer"] for b in json.loads(run(bus_address, "status", "--json").stdout)] == [None, None]


def test_a_corrupt_byte_on_the_wire_fails_the_migration_and_applies_nothing(bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="8M")
    incoming = Incoming(dest_bus, f"unix:{tmp_path / 'mig.sock'}")
    proxy = CorruptingProxy(str(tmp_path / "proxy.sock"), incoming.address.removeprefix("unix:"), 3 << 20)
    try:
        done = run(bus_address, "migrate", f"unix:{tmp_path / 'proxy.sock'}", "--compression", "none")
    finally:
        proxy.close()
    assert done.returncode == 4, done.stderr
    # The byte lands in one back-end's stream or the other, as the pumps interleave them
    # (in a payload, almost surely: the back-end's own check finds it; in a header, the skim does).
    assert "the destination (unix:" in done.stderr and "failed: Corrupt: " in done.stderr, done.stderr
    assert "back-end 'fs'" in done.stderr or "back-end 'net'" in done.stderr
    assert "nothing was applied" in done.stderr
    code, _, err = incoming.finish()
    assert code in (1, 3) and "back-end '" in err
    assert_source_serves_on(bus_address, reports)
    for _, (src, _) in reports.items():  # quiesced, then resumed with the same state
        assert len(events(src, "quiesced")) <= 1


def test_the_destination_killed_fails_the_source_clearly_and_it_runs_on(bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="64M", dirty="64M")
    incoming = Incoming(dest_bus, f"unix:{tmp_path / 'mig.sock'}")
    migrating = start(bus_address, "migrate", incoming.address, "--max-bandwidth", "16M")
    time.sleep(2.0)
    incoming.process.kill()
    incoming.finish()
    out, err = migrating.communicate(timeout=60)
    assert migrating.returncode == 4, err
    assert "the connection to unix:" in err and ("ended without" in err or "was lost" in err)
    assert_source_serves_on(bus_address, reports)


def test_sigterm_on_the_source_resumes_it_and_the_destination_discards(bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="64M", dirty="64M")
    incoming = Incoming(dest_bus, f"unix:{tmp_path / 'mig.sock'}")
    migrating = start(bus_address, "migrate", incoming.address, "--max-bandwidth", "16M")
    time.sleep(2.0)
    migrating.send_signal(signal.SIGTERM)
    out, err = migrating.communicate(timeout=60)
    assert migrating.returncode == 130 and "interrupted (SIGTERM)" in err
    code, _, err = incoming.finish()
    assert code == 4 and "before the end of the container" in err
    assert_source_serves_on(bus_address, reports)
    states = [b["state"] for b in json.loads(run(dest_bus, "status", "--json").stdout)]
    assert states == ["running", "running"]


def test_sigterm_on_the_destination_tells_the_source_which_resumes(bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="64M", dirty="64M")
    incoming = Incoming(dest_bus, f"unix:{tmp_path / 'mig.sock'}")
    migrating = start(bus_address, "migrate", incoming.address, "--max-bandwidth", "16M")
    time.sleep(2.0)
    incoming.process.send_signal(signal.SIGTERM)
    code, _, err = incoming.finish()
    assert code == 130 and "interrupted (SIGTERM)" in err
    _, err = migrating.communicate(timeout=60)
    assert migrating.returncode == 4, err
    assert "the destination (unix:" in err and "was interrupted (SIGINT or SIGTERM); nothing was applied" in err
    assert_source_serves_on(bus_address, reports)
    states = [b["state"] for b in json.loads(run(dest_bus, "status", "--json").stdout)]
    assert states == ["running", "running"]


def test_cancel_on_the_source_fails_the_migration_and_both_sides_keep_their_state(bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="64M", dirty="64M")
    incoming = Incoming(dest_bus, f"unix:{tmp_path / 'mig.sock'}")
    migrating = start(bus_address, "migrate", incoming.address, "--max-bandwidth", "16M")
    time.sleep(2.0)
    assert run(bus_address, "cancel").returncode == 0  # another helper (an operator) cancels the transfers
    _, err = migrating.communicate(timeout=60)
    assert migrating.returncode == 1, err
    assert "back-end '" in err and "cancel" in err.lower()
    code, _, err = incoming.finish()
    assert code == 4 and "before the end of the container" in err
    assert_source_serves_on(bus_address, reports)


def test_a_peer_that_is_not_a_destination_is_named(bus_address, memstate, tmp_path):
    memstate("fs", "--size", "1M")
    path = str(tmp_path / "ssh.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def banner() -> None:
        conn, _ = server.accept()
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        conn.recv(100)
        time.sleep(1)
        conn.close()

    thread = threading.Thread(target=banner, daemon=True)
    thread.start()
    done = run(bus_address, "migrate", f"unix:{path}")
    thread.join(10)
    server.close()
    assert done.returncode == 4
    assert "is not a dbus-vmstate2 migration peer" in done.stderr and "SSH-2.0" in done.stderr


def test_nobody_listening_and_timeouts_are_stated(bus_address, dest_bus, memstate, tmp_path):
    memstate("fs", "--size", "1M")
    done = run(bus_address, "migrate", f"unix:{tmp_path / 'nobody.sock'}")
    assert done.returncode == 4 and "cannot connect to unix:" in done.stderr and "No such file" in done.stderr
    memstate("fs", address=dest_bus)
    waited = run(dest_bus, "incoming", f"unix:{tmp_path / 'mig.sock'}", "--accept-timeout", "0.5")
    assert waited.returncode == 4 and "no source connected" in waited.stderr and "within 0.5 s (the accept timeout)" in waited.stderr


@pytest.mark.parametrize("through", ["socket", "pipes"])
def test_migrate_through_exec_and_stdio(bus_address, dest_bus, memstate, tmp_path, through):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="4M")
    remote = f"PYTHONWARNINGS=error {' '.join(COMMAND)} incoming stdio: --address {dest_bus}"
    if through == "pipes":  # as ssh may give its command: two pipes, not one socket
        remote = f"cat | {remote} | cat"
    done = run(bus_address, "migrate", f"exec:{remote}", "--json")
    assert done.returncode == 0, done.stderr
    assert "received 2 back-end(s)" in done.stderr  # the far end's report, on its standard error
    assert json.loads(done.stdout)["uri"].startswith("exec:")
    assert_moved(reports)


def test_file_uris_are_the_live_save_and_a_load(bus_address, dest_bus, memstate, tmp_path):
    reports = pair(memstate, bus_address, dest_bus, tmp_path, size="4M")
    saved = tmp_path / "vm.vmstate"
    done = run(bus_address, "migrate", f"file:{saved}", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["uri"] == f"file:{saved}"
    loaded = run(dest_bus, "incoming", f"file:{saved}")
    assert loaded.returncode == 0, loaded.stderr
    assert_moved(reports)
