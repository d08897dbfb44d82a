"""Migration URIs (dbus_vmstate2.vmm.uri): pure parsing."""

from __future__ import annotations

import pytest

from dbus_vmstate2.vmm.uri import BadUri, ExecUri, FileUri, StdioUri, TcpUri, UnixUri, parse_uri


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("tcp:dest.example:4444", TcpUri("dest.example", 4444)),
        ("tcp:10.0.0.2:1", TcpUri("10.0.0.2", 1)),
        ("tcp:[::1]:65535", TcpUri("::1", 65535)),
        ("tcp:[fe80::1%veth0]:4444", TcpUri("fe80::1%veth0", 4444)),
        ("unix:/run/vm/migrate.sock", UnixUri("/run/vm/migrate.sock")),
        ("unix:relative:with:colons", UnixUri("relative:with:colons")),
        ("exec:ssh dest dbus-vmstate2 incoming stdio:", ExecUri("ssh dest dbus-vmstate2 incoming stdio:")),
        ("file:/var/lib/vm.vmstate", FileUri("/var/lib/vm.vmstate")),
    ],
)
def test_the_forms_of_qemu(text, parsed):
    assert parse_uri(text) == parsed
    assert parse_uri(text, incoming=True) == parsed
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("tcp::4444", TcpUri("", 4444)), ("tcp:127.0.0.1:0", TcpUri("127.0.0.1", 0)), ("stdio:", StdioUri())],
)
def test_listening_forms_only_for_incoming(text, parsed):
    assert parse_uri(text, incoming=True) == parsed
    with pytest.raises(BadUri):
        parse_uri(text)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("dest:4444", "unknown transport 'dest'"),
        ("/tmp/sock", "not a migration URI"),
        ("tcp:dest", "with a port"),
        ("tcp:dest:", "the port must be a number"),
        ("tcp:dest:65536", "from 1 to 65535"),
        ("tcp:dest:-1", "the port must be"),
        ("tcp:::1:4444", "goes in brackets"),
        ("tcp:[::1:4444", "after the closing bracket"),
        ("tcp:[::1]4444", "after the closing bracket"),
        ("tcp:[dest]:4444", "brackets hold an IPv6 address"),
        ("unix:", "with a path"),
        ("unix:a\0b", "NUL"),
        ("exec: ", "with a command"),
        ("file:", "with a path"),
        ("stdio:x", "nothing after the colon"),
        ("rdma:host:4444", "unknown transport 'rdma'"),
    ],
)
def test_bad_uris_say_what_is_wrong(text, says):
    with pytest.raises(BadUri, match=says):
        parse_uri(text, incoming=True)


def test_stdio_on_migrate_points_to_incoming():
    with pytest.raises(BadUri, match="for 'incoming' only"):
        parse_uri("stdio:")
