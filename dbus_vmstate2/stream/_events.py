"""The decoder's events: small frozen values, one per stream part (h11 style).

:meth:`StreamDecoder.next_event` returns exactly one of :class:`StreamHeader`
(once, first), :class:`Record` (zero or more, in order, each verified) and
:class:`StreamEnd` (once, last, after the whole stream verified), or the
sentinel :data:`NEED_DATA`.  A decoder made with ``decompress=False`` gives a
zstd record as a :class:`~.decoder.CompressedRecord` instead, whose frame is
verified only by its ``decompress()``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._format import DIGEST_SIZE, FORMAT_VERSION, MAX_RECORD_SIZE, Compression, RecordType


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA = _Sentinel.NEED_DATA
"""Returned by ``next_event()`` when more input (or ``feed_eof()``) is needed."""


class Event:
    """Base class of the decoder's events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StreamHeader(Event):
    """The verified stream header (docs/stream-format.md §2)."""

    backend_id: str
    """The back-end Id the stream belongs to."""
    compression: Compression
    """How record payloads are compressed."""
    level: int = 0
    """The writer's zstd level (informational; 0 when uncompressed)."""
    version: int = FORMAT_VERSION
    """The stream format version."""
    size: int = 0
    """Bytes the header occupies on the wire."""

    def __post_init__(self) -> None:
        if not self.backend_id:
            raise ValueError("backend_id must not be empty")


@dataclass(frozen=True, slots=True)
class Record(Event):
    """One verified record (§3), delivered in stream order."""

    seq: int
    """Sequence number: 0 for the first record, then +1."""
    type: RecordType
    """What the record carries."""
    payload: memoryview | None
    """The read-only payload; ``None`` when the decoder skims (``payloads=False``)."""
    raw_size: int
    """Payload size after decompression."""
    wire_size: int
    """Payload size on the wire (the zstd frame when compressed)."""

    def __post_init__(self) -> None:
        if not 0 <= self.raw_size <= MAX_RECORD_SIZE:
            raise ValueError(f"raw_size {self.raw_size} out of range")
        if self.payload is not None and len(self.payload) != self.raw_size:
            raise ValueError("payload length differs from raw_size")


@dataclass(frozen=True, slots=True)
class StreamEnd(Event):
    """The verified trailer (§5): the whole stream checked out."""

    records: int
    """Number of records."""
    raw_bytes: int
    """Sum of the records' raw payload sizes."""
    wire_bytes: int
    """Size of the whole stream on the wire, header to trailer inclusive."""
    digest: bytes
    """The stream digest (SHA-256 over header, record headers and trailer fields)."""

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"digest must be {DIGEST_SIZE} bytes")
