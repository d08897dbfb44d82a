"""The stream decoder: wire bytes in, verified events out (docs/stream-format.md).

Sans-IO, as h11: :meth:`StreamDecoder.feed` queues input of any segmentation,
:meth:`StreamDecoder.next_event` returns the next verified event or
:data:`NEED_DATA`.  Any bad input raises a :class:`~dbus_vmstate2.errors.StreamError`
subclass, and the decoder then stays failed (every later call raises the same
error).  Memory is bounded by the format's limits: the decoder never buffers
more than one record (MAX_RECORD_SIZE raw plus its frame) beyond the chunk the
caller last fed, and never decompresses more than the declared size plus one.

Input chunks that are read-only (``bytes``) are kept by reference, so a
payload that lies inside one fed chunk is returned as a memoryview slice of it
without a copy; mutable chunks (``bytearray``) are copied once on ``feed``.
"""

from __future__ import annotations

import enum
import hashlib
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import Corrupt, IdMismatch, Malformed, StreamError, StreamLimitExceeded, Truncated, UnsupportedVersion
from ._events import NEED_DATA, Event, Record, StreamEnd, StreamHeader, _Sentinel
from ._format import (
    HEADER_FIXED_SIZE,
    RECORD_HEADER_SIZE,
    TRAILER_SIZE,
    TRAILER_TYPE,
    VERSION_END,
    WINDOW_LOG_MAX,
    Compression,
    RecordType,
    check_magic,
    check_version,
    crc32,
    header_size,
    parse_header,
    parse_record,
    parse_trailer,
    zstd_check,
    zstd_frame_header,
)
from ._zstd import zstd

Buffer = bytes | bytearray | memoryview


SMALL_INPUT = 64 << 10
"""Pieces of input smaller than this are gathered into one buffer: a stream
fed a byte at a time (a SOCK_SEQPACKET socket, a slow pipe) must cost no more
memory than the bytes it carries, not an object per piece."""


class _Input:
    """A queue of read-only memoryviews, consumed from the front.

    Small pieces that follow one another go into ``_small`` and become one
    chunk when it is full or when anything is consumed; other pieces are kept
    as they are.
    """

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self._small = bytearray()
        self.size = 0

    def append(self, data: Buffer, copy: bool) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if not view.nbytes:
            return
        self.size += view.nbytes
        # A small piece after another small one is gathered (copied); a lone
        # one, like a large one, is kept as it is (viewed, not copied).
        if view.nbytes < SMALL_INPUT and (self._small or (self._chunks and len(self._chunks[-1]) < SMALL_INPUT)):
            self._small += view
            if len(self._small) >= SMALL_INPUT:
                self._gather()
            return
        self._gather()
        if copy and not view.readonly:  # the caller may reuse its buffer: keep our own copy
            view = memoryview(view.tobytes())
        self._chunks.append(view)

    def _gather(self) -> None:
        if self._small:
            self._chunks.append(memoryview(bytes(self._small)))
            self._small = bytearray()

    def detach(self) -> None:
        """Copy what is left of mutable chunks (a few bytes when skimming)."""
        for i, chunk in enumerate(self._chunks):
            if not chunk.readonly:
                self._chunks[i] = memoryview(chunk.tobytes())

    def peek(self, n: int) -> bytes:
        """The first min(n, size) bytes, copied (n is small)."""
        self._gather()
        out = b""
        for chunk in self._chunks:
            if len(out) >= n:
                break
            out += chunk[: n - len(out)]
        return out[:n]

    def take(self, n: int) -> memoryview:
        """Remove and return the first n bytes (size >= n); no copy within one chunk."""
        self._gather()
        first = self._chunks[0]
        if len(first) >= n:
            out = first[:n]
            self._drop(n)
            return out
        parts = []
        need = n
        while need:
            chunk = self._chunks[0]
            parts.append(chunk[:need])
            need -= min(need, len(chunk))
            self._drop(len(parts[-1]))
        return memoryview(b"".join(parts))

    def skip(self, n: int) -> int:
        """Discard up to n bytes; return how many were discarded."""
        self._gather()
        done = 0
        while done < n and self._chunks:
            step = min(n - done, len(self._chunks[0]))
            self._drop(step)
            done += step
        return done

    def _drop(self, n: int) -> None:
        first = self._chunks[0]
        if n == len(first):
            self._chunks.popleft()
        else:
            self._chunks[0] = first[n:]
        self.size -= n


class _State(enum.Enum):
    HEADER = "header"
    UNIT = "record header or trailer"
    PAYLOAD = "record payload"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class CompressedRecord(Event):
    """A zstd record whose frame is neither decompressed nor checked yet,
    from a decoder made with ``decompress=False``: :meth:`decompress` makes
    it a verified :class:`Record`, in whichever thread calls it.

    Its framing, sequence number and limits are checked, and the trailer's
    counts and digest cover it, as for any record; its payload is not
    verified until :meth:`decompress` has returned.
    """

    seq: int
    """Sequence number: 0 for the first record, then +1."""
    type: RecordType
    """What the record carries."""
    frame: memoryview
    """The record's zstd frame, as on the wire (read-only)."""
    raw_size: int
    """Payload size after decompression, as the record header declares it."""
    check: int
    """The record header's check of the frame (§4.2)."""

    @property
    def wire_size(self) -> int:
        """Payload size on the wire: the frame's."""
        return len(self.frame)

    def decompress(self) -> Record:
        """Decompress and verify the frame (§4), at most ``raw_size`` + 1 bytes of output.

        Raises:
            Corrupt: the frame's check, its content checksum or its size is wrong.
            Malformed: the frame header breaks a rule of §4 (no content
                checksum, a dictionary, reserved bits).
            StreamLimitExceeded: the frame asks for a window over WINDOW_LOG_MAX.
        """
        payload = memoryview(_unzstd(self.frame, self.raw_size, self.check, self.seq))
        return Record(self.seq, self.type, payload, self.raw_size, len(self.frame))


class StreamDecoder:
    """Decode and verify one stream.

    Args:
        expected_id: if given, a stream whose header names another Id raises
            IdMismatch.
        payloads: False to skim: payloads are skipped, not decompressed nor
            checksummed, and records carry sizes only.  Framing, sequence
            numbers, limits and the whole trailer (counts and digest) are
            still checked, because the digest covers only headers.  A skimming
            decoder does not copy mutable input on feed(): call next_event()
            until NEED_DATA before reusing a fed buffer.
        decompress: False to leave each zstd record to its consumer: it comes
            out as a :class:`CompressedRecord`, whose ``decompress()``
            verifies it, e.g. in the thread that takes the record, so that
            reading the stream overlaps decompressing it.  All else is checked
            here as usual (an uncompressed record's CRC-32 too); the stream
            is verified once StreamEnd has come and every CompressedRecord
            has been decompressed.
    """

    def __init__(self, expected_id: str | None = None, *, payloads: bool = True, decompress: bool = True) -> None:
        self.expected_id = expected_id
        self.payloads = payloads
        self.decompress = decompress
        self.header: StreamHeader | None = None
        """The stream header, once decoded."""
        self.records = 0
        """Records decoded so far."""
        self.raw_bytes = 0
        """Raw payload bytes of the records decoded so far."""
        self.wire_bytes = 0
        """Stream bytes consumed so far."""
        self._in = _Input()
        self._state = _State.HEADER
        self._eof = False
        self._error: StreamError | None = None
        self._digest = hashlib.sha256()
        self._end_of_initial = False
        self._rec: tuple[RecordType, int, int, int] = (RecordType.DATA, 0, 0, 0)
        self._skipped = 0

    @property
    def done(self) -> bool:
        """True once StreamEnd has been returned."""
        return self._state is _State.DONE

    def feed(self, data: Buffer) -> None:
        """Queue input bytes (any bytes-like, any size, any segmentation).

        Raises:
            Malformed: bytes arrive after the trailer.
            RuntimeError: called after feed_eof().
        """
        if self._eof:
            raise RuntimeError("StreamDecoder.feed() after feed_eof()")
        self._in.append(data, copy=self.payloads)
        if self._state is _State.DONE and self._in.size and self._error is None:
            self._error = _after_trailer(self._in.size)
            raise self._error

    def read_size(self) -> int:
        """The best size for the caller's next read: the bytes that complete
        the unit being decoded (the header, a record header or trailer, a
        payload), plus, after a payload, the next record's header.

        A reader that fills a fresh read-only buffer of exactly this size
        before feeding it hands the decoder whole units: each payload lies
        in one buffer and is returned as a view of it, never joined from
        pieces, with one read per record.  0 once the stream has ended.
        """
        if self._state is _State.DONE:
            return 0
        if self._state is _State.HEADER:
            fixed = self._in.size >= HEADER_FIXED_SIZE
            need = header_size(self._in.peek(HEADER_FIXED_SIZE)) if fixed else HEADER_FIXED_SIZE
        elif self._state is _State.UNIT:
            is_trailer = self._in.size > 0 and self._in.peek(1)[0] == TRAILER_TYPE
            need = TRAILER_SIZE if is_trailer else RECORD_HEADER_SIZE
        else:
            need = self._rec[2] - self._skipped + RECORD_HEADER_SIZE
        return max(need - self._in.size, 1)

    def feed_eof(self) -> None:
        """Mark the end of input; a stream then lacking its trailer raises Truncated."""
        self._eof = True

    def next_event(self) -> StreamHeader | Record | CompressedRecord | StreamEnd | _Sentinel:
        """Return the next verified event (a CompressedRecord: verified but
        for its frame), or NEED_DATA.

        Returns:
            StreamHeader first, then each Record (or CompressedRecord, with
            ``decompress=False``) in order, then StreamEnd; then NEED_DATA
            forever.  NEED_DATA also means "feed more bytes".

        Raises:
            StreamError: one of BadMagic, UnsupportedVersion, Truncated,
                Corrupt, Malformed, IdMismatch, StreamLimitExceeded (which
                one for which fault: docs/stream-format.md §6.3).  The decoder
                is then failed for good and raises the same error on every call.
        """
        if self._error is not None:
            raise self._error
        try:
            event = self._next()
            if event is NEED_DATA and not self.payloads:
                self._in.detach()
            return event
        except StreamError as exc:
            self._error = exc
            raise

    def _need(self, n: int) -> _Sentinel:
        if not self._eof:
            return NEED_DATA
        at = self.wire_bytes + self._skipped + self._in.size
        where = f"record {self.records}'s payload" if self._state is _State.PAYLOAD else f"the {self._state.value}"
        raise Truncated(f"stream ended after {at} bytes, inside {where}: expected {n} more bytes, found {self._in.size}")

    def _next(self) -> StreamHeader | Record | StreamEnd | _Sentinel:
        if self._state is _State.HEADER:
            return self._header()
        if self._state is _State.UNIT:
            if self._in.size < 1:
                return self._need(1)
            is_trailer = self._in.peek(1)[0] == TRAILER_TYPE
            size = TRAILER_SIZE if is_trailer else RECORD_HEADER_SIZE
            if self._in.size < size:
                return self._need(size)
            raw = self._in.take(size).tobytes()
            if is_trailer:
                return self._trailer(raw)
            assert self.header is not None
            self._rec = parse_record(raw, self.records, self.header.compression)
            if self._rec[0] is RecordType.END_OF_INITIAL:
                if self._end_of_initial:
                    raise Malformed(f"record {self.records}: second END_OF_INITIAL, expected at most one")
                self._end_of_initial = True
            self._digest.update(raw)
            self.wire_bytes += size
            self._state = _State.PAYLOAD
        if self._state is _State.PAYLOAD:
            return self._payload()
        if self._in.size:  # DONE
            raise _after_trailer(self._in.size)
        return NEED_DATA

    def _header(self) -> StreamHeader | _Sentinel:
        # §2: each field is judged as soon as it has arrived, so the error
        # does not depend on how the input was cut.
        prefix = self._in.peek(VERSION_END)
        check_magic(prefix)
        if len(prefix) == VERSION_END:
            check_version(prefix)
        if self._in.size < HEADER_FIXED_SIZE:
            return self._need(HEADER_FIXED_SIZE)
        size = header_size(self._in.peek(HEADER_FIXED_SIZE))
        if self._in.size < size:
            return self._need(size)
        raw = self._in.take(size).tobytes()
        backend_id, compression, level = parse_header(raw)
        if self.expected_id is not None and backend_id != self.expected_id:
            raise IdMismatch(f"stream is for back-end Id {backend_id!r}, expected {self.expected_id!r}")
        self._digest.update(raw)
        self.wire_bytes += size
        self._state = _State.UNIT
        self.header = StreamHeader(backend_id, compression, level, size=size)
        return self.header

    def _payload(self) -> Record | CompressedRecord | _Sentinel:
        rtype, raw_len, wire_len, check = self._rec
        payload: memoryview | None = None
        if not self.payloads:
            self._skipped += self._in.skip(wire_len - self._skipped)
            if self._skipped < wire_len:
                return self._need(wire_len - self._skipped)
            self._skipped = 0
        elif wire_len:
            if self._in.size < wire_len:
                return self._need(wire_len)
            data = self._in.take(wire_len)
            assert self.header is not None
            if self.header.compression is Compression.NONE:
                found = crc32(data)
                if found != check:
                    raise Corrupt(f"record {self.records}: payload CRC {found:#010x}, expected {check:#010x}")
                payload = data
            elif not self.decompress:
                return self._decoded(CompressedRecord(self.records, rtype, data, raw_len, check))
            else:
                payload = memoryview(_unzstd(data, raw_len, check, self.records))
        else:
            payload = memoryview(b"")
        return self._decoded(Record(self.records, rtype, payload, raw_len, wire_len))

    def _decoded(self, event: Record | CompressedRecord) -> Record | CompressedRecord:
        self.records += 1
        self.raw_bytes += event.raw_size
        self.wire_bytes += event.wire_size
        self._state = _State.UNIT
        return event

    def _trailer(self, raw: bytes) -> StreamEnd:
        reserved, records, raw_bytes, wire_bytes, digest = parse_trailer(raw)
        for what, found, want in (
            ("records", records, self.records),
            ("raw bytes", raw_bytes, self.raw_bytes),
            ("stream bytes before the trailer", wire_bytes, self.wire_bytes),
        ):
            if found != want:
                raise Corrupt(f"trailer says {found} {what}, the stream has {want}")
        self._digest.update(raw[:32])
        want_digest = self._digest.digest()
        if digest != want_digest:
            raise Corrupt(f"stream digest {digest.hex()}, expected {want_digest.hex()}")
        if reserved:
            raise UnsupportedVersion("trailer flags or reserved fields set, expected 0")
        self.wire_bytes += TRAILER_SIZE
        self._state = _State.DONE
        if self._in.size:  # §5: judged after the trailer, whether they came with it or later
            raise _after_trailer(self._in.size)
        return StreamEnd(records, raw_bytes, self.wire_bytes, digest)


def _after_trailer(size: int) -> Malformed:
    return Malformed(f"{size} bytes after the stream trailer, expected none (the stream ended there)")


def _unzstd(frame: memoryview, raw_len: int, check: int, seq: int) -> bytes:
    """Decompress one record's zstd frame with bounded output (§4)."""
    found = zstd_check(frame)
    if found != check:
        raise Corrupt(f"record {seq}: zstd frame check {found:#010x}, expected {check:#010x}")
    window = zstd_frame_header(frame, seq)
    if window > 1 << WINDOW_LOG_MAX:
        raise StreamLimitExceeded(f"record {seq}: zstd frame needs a window of {window} bytes, limit {1 << WINDOW_LOG_MAX}")
    dec = zstd.ZstdDecompressor(options={zstd.DecompressionParameter.window_log_max: WINDOW_LOG_MAX})
    try:
        # max_length bounds the output whatever the frame claims: a bomb stops here.
        out = dec.decompress(frame, max_length=raw_len + 1)
    except zstd.ZstdError as exc:  # libzstd's own words: "Data corruption detected", ...
        raise Corrupt(f"record {seq}: the zstd frame does not decode ({exc})") from None
    if len(out) != raw_len or not dec.eof or dec.unused_data:
        state = "complete" if dec.eof else "incomplete"
        raise Corrupt(
            f"record {seq}: zstd frame gave {len(out)}{'+' if len(out) > raw_len else ''} bytes "
            f"({state} frame, {len(dec.unused_data)} bytes after it), expected {raw_len}"
        )
    return out


class DecodedStream(NamedTuple):
    """What :func:`decode_stream` returns."""

    header: StreamHeader
    records: list[Record]
    end: StreamEnd


def decode_stream(data: Buffer, expected_id: str | None = None) -> DecodedStream:
    """Decode and verify a whole (small) stream held in memory.

    Args:
        data: the complete stream.
        expected_id: the Id the stream must carry, if any.

    Returns:
        The header, the records in order, and the end.

    Raises:
        StreamError: as StreamDecoder.next_event().
    """
    dec = StreamDecoder(expected_id)
    dec.feed(data)
    dec.feed_eof()
    header, records = None, []
    while (event := dec.next_event()) is not NEED_DATA:
        if isinstance(event, StreamHeader):
            header = event
        elif isinstance(event, Record):
            records.append(event)
        else:
            assert header is not None and isinstance(event, StreamEnd)
            return DecodedStream(header, records, event)
    raise AssertionError("unreachable: feed_eof() makes the decoder finish or raise")
