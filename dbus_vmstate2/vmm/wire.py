"""The migration protocol's control messages: pure, no I/O (docs/migration.md §2).

Between the handshake and the destination's answer, the source sends the
container (docs/stream-format.md §7) exactly as a saved file holds it; the
few other messages are framed here.  A message is a 16-byte header (magic,
kind, protocol version, reserved, body length), a JSON object as its body
(UTF-8, at most :data:`MAX_BODY` bytes) and a CRC-32 of both, so that a wrong
peer (an ssh banner, an HTTP server, a QEMU migration stream) or damage fails
at the first message with an error that says so.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadMagic, Corrupt, Malformed, StreamLimitExceeded, Truncated, UnsupportedVersion
from ..stream._events import NEED_DATA, _Sentinel
from ..stream._format import crc32

MAGIC = b"\x89VM2M\r\n\x1a"
PROTOCOL_VERSION = 1
MAX_BODY = 1 << 20
_HEAD = struct.Struct("<8sBBHI")  # magic kind version reserved length
HEAD_SIZE = _HEAD.size  # 16


class Kind(enum.IntEnum):
    """What a message says; the direction is fixed per kind."""

    HELLO = 1
    """Source -> destination, first: ``{"backends": [Id, ...]}`` in stream-number order;
    ``"progress": true`` (optional) asks for PROGRESS messages."""
    READY = 2
    """Destination -> source: every back-end is there and loading; send the container.
    ``{"backends": [Id, ...], "setup_seconds": s}``: ``s``, optional, is how long the
    destination took from HELLO to READY (the source's estimate of its commit)."""
    REFUSED = 3
    """Destination -> source, instead of READY: ``{"error": ..., "message": ...}``; nothing started."""
    COMMITTED = 4
    """Destination -> source, after the container: every back-end verified and committed."""
    FAILED = 5
    """Destination -> source, instead of COMMITTED: ``{"error", "message", "backend"}``; nothing applied."""
    PROGRESS = 6
    """Destination -> source, only if the HELLO asked, every :data:`PROGRESS_INTERVAL` while
    the container comes: ``{"buffered": n}``, the bytes it has received and its back-ends have
    not yet read (its socket's queue, its own buffers, their pipes)."""


PROGRESS_INTERVAL = 0.05
"""Seconds between two PROGRESS messages."""


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    body: dict[str, Any] = field(default_factory=dict)


def encode(message: Message) -> bytes:
    """The bytes of ``message``.

    Raises:
        ValueError: a body that is not JSON, or too large.
    """
    body = json.dumps(message.body, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > MAX_BODY:
        raise ValueError(f"a {message.kind.name} body of {len(body)} bytes, limit {MAX_BODY}")
    head = _HEAD.pack(MAGIC, message.kind, PROTOCOL_VERSION, 0, len(body))
    return head + body + struct.pack("<I", crc32(head + body))


class MessageReader:
    """Decode messages from the bytes of a connection: ``feed``, then ``next_message``.

    Raises (from next_message): StreamError subclasses only: BadMagic (not a
    dbus-vmstate2 migration peer), UnsupportedVersion, Corrupt, Malformed,
    StreamLimitExceeded, and Truncated after ``feed_eof`` in a message.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a message."""
        return len(self._buf)

    def take_buffered(self) -> bytes:
        """Remove and return what was received after the last message (the container's first bytes)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_message(self) -> Message | _Sentinel:
        buf = self._buf
        if len(buf) >= len(MAGIC) and buf[: len(MAGIC)] != MAGIC or len(buf) < len(MAGIC) and MAGIC[: len(buf)] != buf:
            shown = bytes(buf[:16])
            raise BadMagic(f"the peer is not a dbus-vmstate2 migration peer: it sent {shown!r}")
        if len(buf) < HEAD_SIZE:
            return self._need()
        _, kind, version, reserved, length = _HEAD.unpack_from(buf)
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"the peer speaks migration protocol version {version}, expected {PROTOCOL_VERSION}")
        if length > MAX_BODY:
            raise StreamLimitExceeded(f"a message body of {length} bytes, limit {MAX_BODY}")
        if len(buf) < HEAD_SIZE + length + 4:
            return self._need()
        raw = bytes(buf[: HEAD_SIZE + length])
        (crc,) = struct.unpack_from("<I", buf, HEAD_SIZE + length)
        del buf[: HEAD_SIZE + length + 4]
        if crc != crc32(raw):
            raise Corrupt(f"a message CRC {crc:#010x}, expected {crc32(raw):#010x}")
        if kind not in tuple(Kind) or reserved:
            raise UnsupportedVersion(f"a message of kind {kind} with reserved {reserved:#06x}: expected a kind 1..6 and 0")
        try:
            body = json.loads(raw[HEAD_SIZE:].decode())
        except (UnicodeDecodeError, ValueError) as exc:
            raise Malformed(f"a {Kind(kind).name} message whose body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise Malformed(f"a {Kind(kind).name} message whose body is not a JSON object")
        return Message(Kind(kind), body)

    def _need(self) -> _Sentinel:
        if self._eof:
            raise Truncated(f"the connection ended in the middle of a message ({len(self._buf)} bytes of it)")
        return NEED_DATA


def ready_setup_seconds(message: Message) -> float | None:
    """The destination's time from HELLO to READY, if its READY says (a
    number of seconds >= 0); None otherwise (an older destination)."""
    value = message.body.get("setup_seconds")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        return None
    return float(value)


def progress_buffered(message: Message) -> int | None:
    """The bytes a PROGRESS says the destination holds, or None if it says no count."""
    value = message.body.get("buffered")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def hello_backends(message: Message) -> list[str]:
    """The Ids a HELLO announces.

    Raises:
        Malformed: not a list of distinct non-empty strings.
    """
    ids = message.body.get("backends")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids) or len(set(ids)) != len(ids):
        raise Malformed(f"a HELLO whose back-ends are not a list of distinct Ids: {ids!r}")
    return ids
