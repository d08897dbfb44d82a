"""VMState1's inline blob: the whole state in one D-Bus message.

QEMU treats what ``Save()`` returns as opaque bytes and hands them back to
``Load()`` on the destination, at most 1 MiB per back-end
(``DBUS_VMSTATE_SIZE_LIMIT``; a blob of exactly 1 MiB is accepted).  How a
back-end fills that blob is its :class:`InlineMode`:

* ``stream`` (the default): a complete dbus-vmstate2 stream (header, records,
  trailer; see docs/stream-format.md), so that a back-end migrated by stock
  QEMU still gets the Id check, the integrity check and the versioning of
  VMState2, and its load callable receives the very records its source
  saved.  The framing costs ``112 + len(Id)`` bytes for a state sent as one
  record, so an incompressible state fits if it is at most
  :func:`inline_capacity` bytes (1 048 464 minus the Id's length); a
  compressible one fits if it compresses to that.  A state that fits
  uncompressed is compressed with zstd only if a sample of it shrinks by a
  tenth (:func:`worth_compressing`: some 64 KiB, a twentieth of the cost of
  compressing 1 MiB) and the whole then comes out smaller; a state that
  does not fit uncompressed is always tried.  Save runs inside QEMU's
  downtime, and trying zstd on a state that does not shrink cost more than
  the rest of the call.  Load takes either, whatever the source decided.
* ``legacy``: the state's bytes as they are, as a back-end written by hand
  against QEMU's interface returns them (up to exactly 1 MiB).  Load then
  accepts such a raw blob (handed to the load callable as one record) or a
  stream, told apart by the stream's magic.  This is the upgrade path of a
  daemon that used to serve raw blobs: see the README.
* ``off``: the back-end does not serve VMState1 at all (it neither exports
  the interface nor queues on its name), so QEMU's dbus-vmstate never sees
  it; it moves only through VMState2.

Every limit is checked while encoding, so an oversized state is refused
after at most about 1 MiB has been held, never held whole.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import Iterable

from ..bus import SplitBytes, unchangeable
from ..errors import LimitExceeded, StreamLimitExceeded
from ..names import VMSTATE1_SIZE_LIMIT
from ..stream import NEED_DATA, Compression, Record, RecordType, StreamDecoder, StreamEncoder
from ..stream._format import HEADER_FIXED_SIZE, MAGIC, RECORD_HEADER_SIZE, TRAILER_SIZE
from ..stream._zstd import zstd
from .records import BytesLike, nbytes

INLINE_RAW_LIMIT = 64 << 20
"""The most state one inline blob may carry once decompressed.  A 1 MiB blob
of zstd records could otherwise expand to many GiB held at once, since an
inline Load verifies the whole blob before handing anything over."""

log = logging.getLogger(__name__)


class InlineMode(enum.StrEnum):
    """How a back-end serves org.qemu.VMState1 (the ``vmstate1`` argument of Backend)."""

    STREAM = "stream"
    """Serve VMState1; the blob is a verified dbus-vmstate2 stream."""
    LEGACY = "legacy"
    """Serve VMState1; Save returns the raw state, Load takes a raw state or a stream."""
    OFF = "off"
    """Do not serve VMState1: the back-end moves only through VMState2."""


def stream_overhead(backend_id: str, records: int = 1) -> int:
    """Bytes an uncompressed stream adds to its records' payloads (docs/stream-format.md §2, §3, §5)."""
    return HEADER_FIXED_SIZE + len(backend_id.encode()) + 4 + records * RECORD_HEADER_SIZE + TRAILER_SIZE


def inline_capacity(backend_id: str) -> int:
    """The largest incompressible state (sent as one record) that fits in one
    ``stream`` blob of back-end ``backend_id``: 1 048 464 minus the Id's length."""
    return VMSTATE1_SIZE_LIMIT - stream_overhead(backend_id)


def encode_inline(
    backend_id: str,
    records: Iterable[BytesLike],
    compression: Compression = Compression.ZSTD,
    mode: InlineMode = InlineMode.STREAM,
) -> bytes:
    """The VMState1 blob of a state, joined: :func:`inline_blob` as ``bytes``."""
    return bytes(inline_blob(backend_id, records, compression, mode))


def inline_blob(
    backend_id: str,
    records: Iterable[BytesLike],
    compression: Compression = Compression.ZSTD,
    mode: InlineMode = InlineMode.STREAM,
) -> SplitBytes:
    """The VMState1 blob of a state, at most ``VMSTATE1_SIZE_LIMIT`` bytes,
    as the pieces it is made of, for the reply to send unjoined.

    Runs inside QEMU's downtime, so it does the least it can: the blob
    holds the records that are ``bytes`` as they are (a record of any other
    type is copied, since the daemon could change it while the reply is
    written), and a state that fits uncompressed is compressed only if a
    sample of it shrinks (:func:`worth_compressing`) and the whole then does.

    Args:
        compression: the most a ``stream`` blob may use; a state that does
            not shrink is sent uncompressed.
        mode: ``stream`` or ``legacy`` (see the module docstring).

    Raises:
        LimitExceeded: the blob would exceed QEMU's 1 MiB.
    """
    records = iter(records)
    head, raw = [], 0
    for record in records:  # pull until the state is known to be small, or is not
        head.append(record)
        raw += nbytes(record)
        if raw > VMSTATE1_SIZE_LIMIT:
            break
    if mode is InlineMode.LEGACY:
        if raw > VMSTATE1_SIZE_LIMIT:
            raise _too_large(backend_id, f"is over {VMSTATE1_SIZE_LIMIT} bytes")
        return _pieces(head)
    if raw > VMSTATE1_SIZE_LIMIT:
        if compression is Compression.NONE:
            raise _too_large(backend_id, f"is over {VMSTATE1_SIZE_LIMIT} bytes and is not compressed")
        return _encode_capped(backend_id, itertools.chain(head, records), compression)
    uncompressed = raw + stream_overhead(backend_id, len(head))
    if compression is not Compression.NONE and (uncompressed > VMSTATE1_SIZE_LIMIT or worth_compressing(head)):
        blob = _encode_capped(backend_id, head, compression, cap=uncompressed - 1)
        if blob is not None:
            return blob
    if uncompressed > VMSTATE1_SIZE_LIMIT:
        raise _too_large(
            backend_id,
            f"does not compress and needs {uncompressed} bytes framed (an incompressible state of at most "
            f"{inline_capacity(backend_id)} bytes fits)",
        )
    return _encode_capped(backend_id, head, Compression.NONE)


SAMPLES = 4
"""How many pieces of the state :func:`worth_compressing` compresses."""
SAMPLE_SIZE = 16 << 10
"""The size of each piece (64 KiB in all: about 0.05 ms of zstd level 1 on random bytes, 0.2 ms on text)."""
WORTH_IT = 0.9
"""A state is compressed if its sample compresses to at most this fraction of its size."""


def worth_compressing(records: list[BytesLike]) -> bool:
    """Whether a sample of ``records`` shrinks under zstd level 1 by a tenth or more.

    The sample is :data:`SAMPLES` pieces of :data:`SAMPLE_SIZE` bytes spread
    evenly over the state (all of it if it is smaller): compressing it costs
    about a twentieth of compressing 1 MiB, and on a state that does not
    shrink (encrypted, already compressed, random) it saves the whole of
    that.  It only decides whether to try: a state that fits uncompressed
    is sent uncompressed unless the whole compresses smaller, whatever the
    sample said.
    """
    views = [memoryview(record).cast("B") for record in records]
    total = sum(len(view) for view in views)
    if total <= SAMPLES * SAMPLE_SIZE:
        sample = b"".join(views)
    else:
        pieces, step = [], total // SAMPLES
        for start in range(0, SAMPLES * step, step):
            pieces += _slice(views, start, SAMPLE_SIZE)
        sample = b"".join(pieces)
    if not sample:
        return False
    compressed = zstd.compress(sample, level=1)
    return len(compressed) <= WORTH_IT * len(sample)


def _slice(views: list[memoryview], start: int, size: int) -> list[memoryview]:
    """The views of bytes ``start`` to ``start + size`` of the records, which may span several."""
    out = []
    for view in views:
        if start >= len(view):
            start -= len(view)
            continue
        piece = view[start : start + size]
        out.append(piece)
        size -= len(piece)
        start = 0
        if not size:
            break
    return out


def _encode_capped(
    backend_id: str, records: Iterable[BytesLike], compression: Compression, cap: int | None = None
) -> SplitBytes | None:
    """Encode ``records`` into one blob; with ``cap``, None as soon as the
    blob would exceed it, else LimitExceeded past QEMU's limit.

    Uncompressed, the encoder's chunks are the records themselves (views,
    not copies): a blob of ``bytes`` records holds no copy of the state.
    """
    limit = VMSTATE1_SIZE_LIMIT if cap is None else min(cap, VMSTATE1_SIZE_LIMIT)
    encoder = StreamEncoder(backend_id, compression=compression)
    chunks = encoder.start()
    raw = 0
    for record in records:
        raw += nbytes(record)
        if raw > INLINE_RAW_LIMIT:
            raise _too_large(backend_id, f"is over {INLINE_RAW_LIMIT} bytes, the most one VMState1 blob may carry")
        chunks += encoder.record(record)
        if encoder.wire_bytes + TRAILER_SIZE > limit:
            break
    else:
        chunks += encoder.finish()
        return _pieces(chunks)
    if cap is not None:
        return None
    raise _too_large(backend_id, f"encodes to more than {VMSTATE1_SIZE_LIMIT} bytes")


def _pieces(chunks: Iterable[BytesLike]) -> SplitBytes:
    """The chunks as they are if nobody can change them, else copies."""
    return SplitBytes(chunk if unchangeable(chunk) else bytes(chunk) for chunk in chunks)


def _too_large(backend_id: str, why: str) -> LimitExceeded:
    return LimitExceeded(
        f"the state of back-end {backend_id!r} {why}; QEMU's dbus-vmstate takes at most "
        f"{VMSTATE1_SIZE_LIMIT} bytes per back-end: migrate it through org.qemu.VMState2 (dbus-vmstate2) instead"
    )


def decode_inline(backend_id: str, blob: bytes, mode: InlineMode = InlineMode.STREAM) -> list[Record]:
    """Verify ``blob`` completely and return its records.

    In ``legacy`` mode a blob that does not start with the stream's magic is
    a raw state, returned as one DATA record unchecked (it carries no check).

    Raises:
        LimitExceeded: the blob is over 1 MiB (QEMU would never send it), or
            it decompresses to more than ``INLINE_RAW_LIMIT``.
        StreamError: a subclass naming what is wrong (bad magic, wrong Id,
            truncated, corrupt, ...); nothing has been handed to the daemon.
    """
    if len(blob) > VMSTATE1_SIZE_LIMIT:
        raise LimitExceeded(f"a VMState1 blob is at most {VMSTATE1_SIZE_LIMIT} bytes, got {len(blob)}")
    if mode is InlineMode.LEGACY and blob[: len(MAGIC)] != MAGIC:
        return [Record(0, RecordType.DATA, memoryview(blob), len(blob), len(blob))]
    decoder = StreamDecoder(backend_id)
    decoder.feed(blob)
    decoder.feed_eof()
    records: list[Record] = []
    raw = 0
    while (event := decoder.next_event()) is not NEED_DATA:
        if isinstance(event, Record):
            raw += event.raw_size
            if raw > INLINE_RAW_LIMIT:
                raise StreamLimitExceeded(f"the blob carries over {INLINE_RAW_LIMIT} bytes of state, the inline limit")
            records.append(event)
    return records
