"""The typed errors of dbus-vmstate2, each with its one D-Bus error name.

Every failure a caller can act on is one of these classes.  Each carries its
wire identity as the class attribute ``dbus_name``, so the service boundary
turns it into an error reply in exactly one place and the client turns an
error reply back into the same class (:func:`from_dbus_error`).

Two families, as in h11: :class:`StreamError` means "the peer, the file or the
pipe sent us something wrong" (the remote's fault); the others mean a request
that cannot be served as asked (the caller's fault or a back-end failure).
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable

ERROR_PREFIX = "org.qemu.VMState2.Error."


class ErrorName(enum.StrEnum):
    """The fixed set of D-Bus error names of org.qemu.VMState2."""

    BUSY = ERROR_PREFIX + "Busy"
    INVALID_STATE = ERROR_PREFIX + "InvalidState"
    FORMAT = ERROR_PREFIX + "Format"
    INTEGRITY = ERROR_PREFIX + "Integrity"
    TRUNCATED = ERROR_PREFIX + "Truncated"
    UNSUPPORTED = ERROR_PREFIX + "Unsupported"
    ID_MISMATCH = ERROR_PREFIX + "IdMismatch"
    LIMIT_EXCEEDED = ERROR_PREFIX + "LimitExceeded"
    ACCESS_DENIED = ERROR_PREFIX + "AccessDenied"
    CANCELLED = ERROR_PREFIX + "Cancelled"
    FAILED = ERROR_PREFIX + "Failed"


class VMStateError(Exception):
    """Base of every error this package raises on purpose."""

    dbus_name: ErrorName = ErrorName.FAILED
    remote_name: str | None = None
    """The error name of the D-Bus reply this was rebuilt from, if any."""


class BackendFailed(VMStateError):
    """The back-end's own save or load code failed (see the back-end's log)."""


class Busy(VMStateError):
    """Another transfer is already running on this back-end."""

    dbus_name = ErrorName.BUSY


class InvalidState(VMStateError):
    """The request is not allowed in the back-end's current migration state."""

    dbus_name = ErrorName.INVALID_STATE


class Unsupported(VMStateError):
    """The peer asks for a feature, version or method this side does not have."""

    dbus_name = ErrorName.UNSUPPORTED


class LimitExceeded(VMStateError):
    """A stated limit (state size, record size, header size, ...) was exceeded."""

    dbus_name = ErrorName.LIMIT_EXCEEDED


class AccessDenied(VMStateError):
    """The caller is not allowed to drive this back-end."""

    dbus_name = ErrorName.ACCESS_DENIED


class Cancelled(VMStateError):
    """The transfer was cancelled; the source keeps its state."""

    dbus_name = ErrorName.CANCELLED


class Stalled(Cancelled):
    """The peer stopped reading or writing for longer than the stated bound:
    the back-end ended the transfer itself (reported as Cancelled)."""


class StreamError(VMStateError):
    """The stream or file we were given is not a valid dbus-vmstate2 stream.

    This is the single "remote sent garbage" error: the decoder raises this
    (or a subclass) for any bad input, and nothing else.  Which subclass, and
    so which D-Bus error name, is fixed by docs/stream-format.md §6.3.
    """

    dbus_name = ErrorName.FORMAT


class BadMagic(StreamError):
    """The data does not start with the expected magic bytes."""


class Malformed(StreamError):
    """A structure whose CRC verified (so it is what its writer wrote) breaks
    a rule of the format: a writer's bug, not damage on the way."""


class UnsupportedVersion(StreamError):
    """The stream's format version or compression is not one we can read."""

    dbus_name = ErrorName.UNSUPPORTED


class Truncated(StreamError):
    """The stream ended before its trailer."""

    dbus_name = ErrorName.TRUNCATED


class Corrupt(StreamError):
    """A checksum, digest, count, size or sequence number does not match the
    value the reader computed: damage on the way, or lost or reordered data."""

    dbus_name = ErrorName.INTEGRITY


class IdMismatch(StreamError):
    """The stream belongs to another back-end Id."""

    dbus_name = ErrorName.ID_MISMATCH


class StreamLimitExceeded(StreamError, LimitExceeded):
    """The stream declares or carries more than a stated limit allows."""

    dbus_name = ErrorName.LIMIT_EXCEEDED


# The class a client raises for each name: the most general class with that
# name, so that ``except Corrupt`` also catches it on the far side of the bus.
_CLASS_BY_NAME: dict[str, type[VMStateError]] = {
    ErrorName.BUSY: Busy,
    ErrorName.INVALID_STATE: InvalidState,
    ErrorName.FORMAT: StreamError,
    ErrorName.INTEGRITY: Corrupt,
    ErrorName.TRUNCATED: Truncated,
    ErrorName.UNSUPPORTED: Unsupported,
    ErrorName.ID_MISMATCH: IdMismatch,
    ErrorName.LIMIT_EXCEEDED: LimitExceeded,
    ErrorName.ACCESS_DENIED: AccessDenied,
    ErrorName.CANCELLED: Cancelled,
    ErrorName.FAILED: BackendFailed,
}


def from_dbus_error(name: str, text: str) -> VMStateError:
    """Rebuild the typed error for a D-Bus error reply ``name`` with ``text``.

    A name outside our set (a bus error, a timeout, ...) becomes
    :class:`BackendFailed` with the foreign name kept in the message.
    """
    cls = _CLASS_BY_NAME.get(name)
    error = BackendFailed(f"{name}: {text}") if cls is None else cls(text)
    error.remote_name = name
    return error


class BusLost(VMStateError):
    """The VMM's bus connection ended (the bus daemon went away)."""


class DiscoveryError(VMStateError):
    """The back-ends on the bus are not the ones asked for (missing or duplicate Ids)."""


class NoBackends(DiscoveryError):
    """No back-end to act on: nothing is queued on org.qemu.VMState1 (or
    nothing was asked for)."""


class MigrationAborted(VMStateError):
    """The VMM helper gave up a live migration before it completed: the state
    changed faster than it could be sent, a back-end stalled or failed, or a
    time limit passed.  The message gives the figures; the source runs on."""


class LinkFailed(VMStateError):
    """A migration's connection failed: it could not be made, TLS refused it,
    it was lost or cut, the peer is not a dbus-vmstate2 migration peer, or a
    wait on it passed its timeout.  The message says what, where and after
    how long.  The source runs on."""


class PeerRefused(VMStateError):
    """The migration's destination refused the state or failed to load it
    (its message names the back-end and the error).  Nothing was applied at
    the destination; the source runs on."""

    peer_error: str | None = None
    """The destination's error type, as it named it (``Corrupt``, ``IdMismatch``, ...)."""


QUOTE_LIMIT = 64
"""How much of a peer's string an error message or a log line quotes."""


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` in quotes for a message, cut to ``limit`` characters.

    A peer chooses the strings it sends (an option's name or value may be
    megabytes long): the reply and the log line that quote it must stay
    small whatever it sent.
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def quote_some(texts: Iterable[str], shown: int = 5) -> str:
    """The first ``shown`` of ``texts`` in sorted order, each :func:`quote`\\ d,
    and how many more there are (a peer may send a million)."""
    texts = list(texts)
    first = heapq.nsmallest(shown, texts)
    more = f" and {len(texts) - len(first)} more" if len(texts) > len(first) else ""
    return ", ".join(quote(t) for t in first) + more
