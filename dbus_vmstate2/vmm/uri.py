"""Migration URIs, as QEMU writes them: pure parsing, no I/O.

``migrate`` and ``incoming`` take the URI forms of QEMU's ``migrate`` and
``-incoming`` (docs/migration.md):

* ``tcp:HOST:PORT``: a TCP connection; an IPv6 address in brackets
  (``tcp:[::1]:4444``).  ``incoming`` listens there; an empty host
  (``tcp::4444``) listens on every address, and port 0 on a free port that
  the command prints.
* ``unix:PATH``: a unix stream socket; ``incoming`` creates it.
* ``exec:COMMAND``: run COMMAND with ``/bin/sh -c`` and talk over its
  standard input and output (``exec:ssh HOST dbus-vmstate2 incoming stdio:``).
* ``stdio:`` (``incoming`` only): talk over our own standard input and
  output, for the far end of ``exec:``.  Not a QEMU form: QEMU's ``-incoming
  exec:`` reads a command's output, which has no way back for the
  acknowledgement.
* ``file:PATH``: no peer at all: ``migrate`` is a live save into PATH and
  ``incoming`` a load from it.
"""

from __future__ import annotations

from dataclasses import dataclass


class BadUri(ValueError):
    """A migration URI that cannot be used; the message says what is wrong and what is expected."""


@dataclass(frozen=True, slots=True)
class TcpUri:
    host: str
    """A host name or address; empty for "every address" (``incoming`` only). No brackets."""
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixUri:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True, slots=True)
class ExecUri:
    command: str
    """Run with ``/bin/sh -c``, as QEMU runs it."""

    def __str__(self) -> str:
        return f"exec:{self.command}"


@dataclass(frozen=True, slots=True)
class StdioUri:
    def __str__(self) -> str:
        return "stdio:"


@dataclass(frozen=True, slots=True)
class FileUri:
    path: str

    def __str__(self) -> str:
        return f"file:{self.path}"


Uri = TcpUri | UnixUri | ExecUri | StdioUri | FileUri

_FORMS = "tcp:HOST:PORT, unix:PATH, exec:COMMAND or file:PATH"


def parse_uri(text: str, *, incoming: bool = False) -> Uri:
    """Parse a migration URI.

    Args:
        incoming: parse it for ``incoming`` (listening): an empty TCP host,
            port 0 and ``stdio:`` are allowed there only.

    Raises:
        BadUri: not one of the forms above, with the reason.
    """
    scheme, colon, rest = text.partition(":")
    forms = _FORMS + (" or stdio:" if incoming else "")
    if not colon:
        raise BadUri(f"{text!r} is not a migration URI: expected {forms}")
    if scheme == "tcp":
        return _tcp(text, rest, incoming)
    if scheme == "unix":
        if not rest:
            raise BadUri(f"{text!r}: expected unix:PATH, with a path")
        if "\0" in rest:
            raise BadUri(f"{text!r}: a socket path cannot hold a NUL byte")
        return UnixUri(rest)
    if scheme == "exec":
        if not rest.strip():
            raise BadUri(f"{text!r}: expected exec:COMMAND, with a command")
        return ExecUri(rest)
    if scheme == "file":
        if not rest:
            raise BadUri(f"{text!r}: expected file:PATH, with a path")
        return FileUri(rest)
    if scheme == "stdio":
        if not incoming:
            raise BadUri(f"{text!r}: stdio: is for 'incoming' only (the far end of exec:); migrate takes {_FORMS}")
        if rest:
            raise BadUri(f"{text!r}: stdio: takes nothing after the colon")
        return StdioUri()
    raise BadUri(f"{text!r}: unknown transport {scheme!r}: expected {forms}")


def _tcp(text: str, rest: str, incoming: bool) -> TcpUri:
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket or not after.startswith(":"):
            raise BadUri(f"{text!r}: expected tcp:[IPV6]:PORT, with the port after the closing bracket")
        if not host or ":" not in host:
            raise BadUri(f"{text!r}: brackets hold an IPv6 address, found {host!r}")
        port_text = after[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise BadUri(f"{text!r}: expected tcp:HOST:PORT, with a port")
        if ":" in host:
            raise BadUri(f"{text!r}: an IPv6 address goes in brackets: tcp:[{host}]:{port_text}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise BadUri(f"{text!r}: the port must be a number from 1 to 65535, not {port_text!r}")
    port = int(port_text)
    if not incoming:
        if not host:
            raise BadUri(f"{text!r}: expected tcp:HOST:PORT, with the destination's host")
        if port == 0:
            raise BadUri(f"{text!r}: the port must be a number from 1 to 65535, not 0")
    return TcpUri(host, port)
