"""The saved-file container: several back-ends' streams in one file (docs/stream-format.md §7).

Layout: a file header, then segments (stream number, length, bytes) in any
interleaving, so that streams read in parallel from several pipes can be
written as they arrive, then an index (one entry per stream) and a fixed-size
footer that locates the index.  Pure code: :class:`ContainerWriter` returns
chunks to write; the ``parse_*`` functions check fixed-size parts that the
file layer (:mod:`dbus_vmstate2.vmm.savefile`) reads; :class:`ContainerReader`
takes a container front to back, as it comes off a socket (a migration,
docs/migration.md), and checks at its end what a file reader checks first.

The index is derived from the streams themselves: the writer skims each
stream as it passes (:class:`StreamDecoder` with ``payloads=False``), so a
stream that is malformed, truncated or for another Id fails the save, and the
index's counts are those the stream's own trailer proved.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import BadMagic, Corrupt, Malformed, StreamLimitExceeded, Truncated, UnsupportedVersion
from ._events import NEED_DATA, StreamEnd, _Sentinel
from ._format import (
    DIGEST_SIZE,
    FORMAT_VERSION,
    HEADER_FIXED_SIZE,
    MAX_ID_SIZE,
    MAX_RECORD_SIZE,
    RECORD_HEADER_SIZE,
    TRAILER_SIZE,
    Compression,
    crc32,
    decode_id,
)
from .decoder import StreamDecoder

FILE_MAGIC = b"\x89VM2F\r\n\x1a"
FILE_VERSION = 1
END_MAGIC = b"VM2FEND\n"
MAX_SEGMENT_SIZE = 16 << 20
"""Largest segment payload; larger writes are split."""
MAX_STREAMS = 1024
"""Most streams (back-ends) in one file."""

_FILE_HEADER = struct.Struct("<8sHHI")  # magic version flags crc
_SEGMENT = struct.Struct("<BBHIII")  # tag flags reserved stream length crc
_INDEX_HEAD = struct.Struct("<BBHI")  # tag flags reserved count
_ENTRY = struct.Struct("<HBbQQQQ32s")  # version compression level records raw stream segments digest
_FOOTER = struct.Struct("<QII8s")  # index_offset index_length crc magic
FILE_HEADER_SIZE = _FILE_HEADER.size  # 16
SEGMENT_HEADER_SIZE = _SEGMENT.size  # 16
FOOTER_SIZE = _FOOTER.size  # 24
SEGMENT_TAG, INDEX_TAG = 0x53, 0x49  # "S", "I"
MAX_INDEX_SIZE = _INDEX_HEAD.size + MAX_STREAMS * (1 + MAX_ID_SIZE + _ENTRY.size) + 4
MIN_INDEX_SIZE = _INDEX_HEAD.size + 4
"""An index of no streams: its head and its CRC (12 bytes)."""


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One index entry: what the file holds for one back-end."""

    backend_id: str
    """The back-end Id (from the stream header)."""
    version: int
    """The stream format version."""
    compression: Compression
    """The stream's compression method."""
    level: int
    """The writer's zstd level (0 when uncompressed)."""
    records: int
    """Number of records."""
    raw_bytes: int
    """Total payload bytes before compression."""
    stream_bytes: int
    """Size of the stream as stored (header to trailer)."""
    segments: int
    """Number of segments holding the stream."""
    digest: bytes
    """The stream's digest (from its trailer)."""

    @property
    def ratio(self) -> float:
        """Raw payload bytes per stored byte (0.0 for an empty state)."""
        return self.raw_bytes / self.stream_bytes if self.raw_bytes and self.stream_bytes else 0.0


def _crc_tail(raw: bytes, what: str) -> None:
    (found,) = struct.unpack_from("<I", raw, len(raw) - 4)
    want = crc32(raw[:-4])
    if found != want:
        raise Corrupt(f"{what} CRC {found:#010x}, expected {want:#010x}")


class ContainerWriter:
    """Build a container; every method returns the chunks to append to the file.

    Call :meth:`start`, then :meth:`open_stream` / :meth:`write` /
    :meth:`close_stream` in any interleaving across streams, then
    :meth:`finish`.  Not thread-safe: the file layer serialises calls.
    """

    def __init__(self) -> None:
        self.offset = 0
        """Bytes returned so far (the file offset of the next chunk)."""
        self._skims: list[StreamDecoder] = []
        self._segments: list[int] = []
        self._infos: list[StreamInfo | None] = []
        self._ends: list[StreamEnd | None] = []
        self._started = self._finished = False

    def start(self) -> list[bytes]:
        """Return the file header.  Raises RuntimeError if called twice."""
        if self._started:
            raise RuntimeError("ContainerWriter.start() called twice")
        self._started = True
        body = _FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, 0, 0)[:-4]
        return self._out([body + struct.pack("<I", crc32(body))])

    def open_stream(self, expected_id: str | None = None) -> int:
        """Add a stream; return its number (0, 1, ...).

        Args:
            expected_id: the Id the stream's header must carry, if known.

        Raises:
            StreamLimitExceeded: more than MAX_STREAMS streams.
        """
        if len(self._skims) >= MAX_STREAMS:
            raise StreamLimitExceeded(f"more than {MAX_STREAMS} streams in one file")
        self._skims.append(StreamDecoder(expected_id, payloads=False))
        self._segments.append(0)
        self._infos.append(None)
        self._ends.append(None)
        return len(self._skims) - 1

    def write(self, stream: int, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """Add stream bytes as one or more segments; the data is not copied.

        Args:
            stream: a number from open_stream(), not yet closed.
            data: the next bytes of that stream, any segmentation.

        Returns:
            Segment headers and slices of ``data``, to write in order.

        Raises:
            StreamError: the bytes are not a valid continuation of the stream.
        """
        skim = self._open(stream)
        view = memoryview(data).cast("B")
        skim.feed(view)
        self._drain(stream)
        out: list[bytes | memoryview] = []
        for start in range(0, len(view), MAX_SEGMENT_SIZE):
            piece = view[start : start + MAX_SEGMENT_SIZE]
            body = _SEGMENT.pack(SEGMENT_TAG, 0, 0, stream, len(piece), 0)[:-4]
            out += [body + struct.pack("<I", crc32(body)), piece]
            self._segments[stream] += 1
        return self._out(out)

    def close_stream(self, stream: int) -> StreamInfo:
        """End a stream: its trailer must have been written and verified.

        Returns:
            The stream's index entry.

        Raises:
            Truncated: the stream ended before its trailer.
        """
        skim = self._open(stream)
        skim.feed_eof()
        self._drain(stream)
        end = self._ends[stream]
        if end is None or skim.header is None:  # unreachable: next_event() raised Truncated
            raise Truncated(f"stream {stream} ended without a trailer")
        head = skim.header
        info = StreamInfo(
            head.backend_id, head.version, head.compression, head.level,
            end.records, end.raw_bytes, end.wire_bytes, self._segments[stream], end.digest,
        )  # fmt: skip
        self._infos[stream] = info
        return info

    def trailer_seen(self, stream: int) -> bool:
        """Whether the stream's trailer has passed (it is complete, not yet closed)."""
        return self._ends[stream] is not None

    def finish(self) -> list[bytes]:
        """Return the index and the footer.

        Raises:
            RuntimeError: a stream is still open.
            Malformed: two streams carry the same back-end Id.
        """
        if not self._started or self._finished:
            raise RuntimeError("ContainerWriter.finish() without start() or twice")
        infos = [i for i in self._infos if i is not None]
        if len(infos) != len(self._infos):
            raise RuntimeError("ContainerWriter.finish() with streams still open")
        index = pack_index(infos)
        offset = self.offset
        footer = _FOOTER.pack(offset, len(index), 0, END_MAGIC)
        footer = footer[:12] + struct.pack("<I", crc32(footer[:12])) + END_MAGIC
        self._finished = True
        return self._out([index, footer])

    def _open(self, stream: int) -> StreamDecoder:
        if not (self._started and not self._finished and 0 <= stream < len(self._skims)):
            raise RuntimeError(f"stream {stream} is not open in a started container")
        if self._infos[stream] is not None:
            raise RuntimeError(f"stream {stream} is already closed")
        return self._skims[stream]

    def _drain(self, stream: int) -> None:
        while (event := self._skims[stream].next_event()) is not NEED_DATA:
            if isinstance(event, StreamEnd):
                self._ends[stream] = event

    def _out(self, chunks: list) -> list:
        self.offset += sum(len(c) for c in chunks)
        return chunks


def pack_index(infos: list[StreamInfo]) -> bytes:
    """Encode the index (§7.3) for ``infos``, in stream-number order.

    Raises:
        Malformed: two entries carry the same Id.
    """
    ids = [i.backend_id for i in infos]
    if len(set(ids)) != len(ids):
        raise Malformed(f"one stream per back-end Id, found duplicates in {ids}")
    parts = [_INDEX_HEAD.pack(INDEX_TAG, 0, 0, len(infos))]
    for i in infos:
        raw_id = i.backend_id.encode()
        parts += [bytes([len(raw_id)]), raw_id]
        parts.append(_ENTRY.pack(i.version, i.compression, i.level, i.records, i.raw_bytes,
                                 i.stream_bytes, i.segments, i.digest))  # fmt: skip
    body = b"".join(parts)
    return body + struct.pack("<I", crc32(body))


def parse_file_header(raw: bytes) -> None:
    """Check the 16-byte file header (§7.5 step 2).

    Raises:
        BadMagic, UnsupportedVersion, Corrupt.
    """
    magic, version, flags, _crc = _FILE_HEADER.unpack(raw)
    if magic != FILE_MAGIC:
        raise BadMagic(f"not a dbus-vmstate2 saved file: expected magic {FILE_MAGIC.hex()}, found {magic.hex()}")
    if version != FILE_VERSION:
        raise UnsupportedVersion(f"saved-file version {version}, expected {FILE_VERSION}")
    _crc_tail(raw, "file header")
    if flags:
        raise UnsupportedVersion(f"saved-file flags {flags:#06x}, expected 0")


def parse_footer(raw: bytes, file_size: int) -> tuple[int, int]:
    """Check the 24-byte footer of a file of ``file_size`` bytes (§7.5 step 3).

    Returns:
        (index offset, index length).

    Raises:
        Truncated: no footer magic (an unfinished or cut file).
        Corrupt: a wrong CRC, or a footer that does not fit the file's size.
        StreamLimitExceeded: an index over MAX_INDEX_SIZE.
        Malformed: an index that cannot be one (inside the file header, or
            shorter than an empty index).
    """
    offset, length, _crc, magic = _FOOTER.unpack(raw)
    if magic != END_MAGIC:
        raise Truncated(
            f"no footer: expected the end magic {END_MAGIC.hex()} in the last 8 bytes, found {magic.hex()} "
            "(an unfinished or cut file)"
        )
    _crc_tail(raw[:16], "footer")
    if length > MAX_INDEX_SIZE:
        raise StreamLimitExceeded(f"index of {length} bytes, limit {MAX_INDEX_SIZE}")
    if offset + length + FOOTER_SIZE != file_size:
        raise Corrupt(
            f"the footer puts the index at {offset} with {length} bytes, ending at {offset + length}, "
            f"but the footer starts at {file_size - FOOTER_SIZE} in this file of {file_size} bytes"
        )
    if offset < FILE_HEADER_SIZE or length < MIN_INDEX_SIZE:
        raise Malformed(
            f"the footer puts the index at {offset} with {length} bytes: expected it at {FILE_HEADER_SIZE} "
            f"or later, at least {MIN_INDEX_SIZE} bytes long"
        )
    return offset, length


def parse_index(raw: bytes) -> list[StreamInfo]:
    """Decode and check the index (§7.5 step 4).

    Raises:
        Corrupt: a wrong CRC.
        UnsupportedVersion: an unknown tag, flags, stream version or compression.
        StreamLimitExceeded: more than MAX_STREAMS streams.
        Malformed: entries that do not fit the index, bytes after them, an Id
            that is empty, not UTF-8, repeated or holds a comma or NUL, or an
            entry no stream could have (see :func:`_check_entry`).
    """
    if len(raw) < MIN_INDEX_SIZE:
        raise Malformed(f"index of {len(raw)} bytes, expected at least {MIN_INDEX_SIZE}")
    _crc_tail(raw, "index")
    tag, flags, reserved, count = _INDEX_HEAD.unpack_from(raw)
    if tag != INDEX_TAG or flags or reserved:
        raise UnsupportedVersion(
            f"index tag {tag:#04x}, flags {flags:#04x}, reserved {reserved:#06x}: expected tag 0x49 ('I'), 0 and 0"
        )
    if count > MAX_STREAMS:
        raise StreamLimitExceeded(f"index lists {count} streams, limit {MAX_STREAMS}")
    end = len(raw) - 4
    pos, infos = _INDEX_HEAD.size, []
    for n in range(count):
        what = f"index entry {n}"
        if pos >= end:
            raise Malformed(f"{what} of {count} starts at the end of the index (at byte {pos} of {end})")
        id_len = raw[pos]
        if id_len == 0 or pos + 1 + id_len + _ENTRY.size > end:
            raise Malformed(
                f"{what}: an Id of {id_len} bytes and its {_ENTRY.size} bytes of fields do not fit the index "
                f"({end - pos - 1} bytes left); expected an Id of 1..{MAX_ID_SIZE} bytes"
            )
        backend_id = decode_id(raw[pos + 1 : pos + 1 + id_len], f"{what}'s Id")
        pos += 1 + id_len
        version, comp, level, records, raw_bytes, stream_bytes, segments, digest = _ENTRY.unpack_from(raw, pos)
        pos += _ENTRY.size
        if version != FORMAT_VERSION:
            raise UnsupportedVersion(f"{what} ({backend_id!r}): stream format version {version}, expected {FORMAT_VERSION}")
        if comp not in tuple(Compression):
            known = ", ".join(f"{int(c)} ({c.name.lower()})" for c in Compression)
            raise UnsupportedVersion(f"{what} ({backend_id!r}): compression method {comp}, expected one of {known}")
        info = StreamInfo(backend_id, version, Compression(comp), level, records, raw_bytes, stream_bytes, segments, digest)
        _check_entry(info, what)
        infos.append(info)
    if pos != end:
        raise Malformed(f"index has {end - pos} bytes after its {count} entries, expected none")
    ids = [i.backend_id for i in infos]
    if len(set(ids)) != len(ids):
        raise Malformed(f"index lists a back-end Id twice: {sorted({i for i in ids if ids.count(i) > 1})}")
    assert all(len(i.digest) == DIGEST_SIZE for i in infos)
    return infos


def _check_entry(info: StreamInfo, what: str) -> None:
    """Refuse an entry that no stream could have (§7.3), as Malformed.

    A stream is at least its header and trailer plus a header per record,
    carries at most MAX_RECORD_SIZE per record, and fills at least one
    segment and at most one segment per byte.
    """
    smallest = HEADER_FIXED_SIZE + len(info.backend_id.encode()) + 4 + TRAILER_SIZE + RECORD_HEADER_SIZE * info.records
    fewest = -(-info.stream_bytes // MAX_SEGMENT_SIZE)
    problems = []
    if info.stream_bytes < smallest:
        problems.append(f"{info.stream_bytes} stream bytes for {info.records} records, expected at least {smallest}")
    if info.raw_bytes > info.records * MAX_RECORD_SIZE:
        problems.append(f"{info.raw_bytes} raw bytes in {info.records} records, expected at most {MAX_RECORD_SIZE} each")
    if not max(fewest, 1) <= info.segments <= info.stream_bytes:
        problems.append(f"{info.segments} segments for {info.stream_bytes} bytes, expected {max(fewest, 1)}..{info.stream_bytes}")
    if problems:
        raise Malformed(f"{what} ({info.backend_id!r}) cannot describe a stream: {'; '.join(problems)}")


def parse_segment_header(raw: bytes, streams: int) -> tuple[int, int]:
    """Check a 16-byte segment header in a file of ``streams`` streams (§7.5 step 5).

    Returns:
        (stream number, data length).

    Raises:
        Corrupt: a wrong CRC.
        UnsupportedVersion: an unknown tag, or flags or reserved bits set.
        Malformed: a stream number the index does not list, or no data.
        StreamLimitExceeded: more data than MAX_SEGMENT_SIZE.
    """
    tag, flags, reserved, stream, length, _crc = _SEGMENT.unpack(raw)
    _crc_tail(raw, "segment header")
    if tag != SEGMENT_TAG or flags or reserved:
        raise UnsupportedVersion(
            f"segment tag {tag:#04x}, flags {flags:#04x}, reserved {reserved:#06x}: expected tag 0x53 ('S'), 0 and 0"
        )
    if stream >= streams:
        raise Malformed(f"segment for stream {stream}, but the index lists {streams} (numbered from 0)")
    if length == 0:
        raise Malformed(f"segment of 0 bytes for stream {stream}, expected 1..{MAX_SEGMENT_SIZE}")
    if length > MAX_SEGMENT_SIZE:
        raise StreamLimitExceeded(f"segment of {length} bytes, limit {MAX_SEGMENT_SIZE}")
    return stream, length


# -- reading front to back (docs/stream-format.md §7.6) ------------------------


@dataclass(frozen=True, slots=True)
class SegmentData:
    """The next bytes of one stream, from a segment (a segment may come in several pieces)."""

    stream: int
    """The stream number (its place in the index)."""
    data: bytes | bytearray


@dataclass(frozen=True, slots=True)
class ContainerEnd:
    """The footer arrived: the index and the footer verified, and every
    stream's byte and segment counts match its index entry (§7.5 steps 2-6)."""

    streams: list[StreamInfo]
    """The index."""
    size: int
    """The container's size, header to footer."""


class ContainerReader:
    """Read a container sequentially: ``feed(bytes)``, then ``next_event()``
    until NEED_DATA.

    The checks are those of §7.5 in stream order: the file header first, each
    segment header as it comes, and at the end the index, the footer (which
    must point back at the index just read) and the counts.  Nothing says
    which Id a stream number stands for until the index: the caller knows it
    from elsewhere (the migration handshake), and checks it against the
    index at the end.  Memory is bounded: segment data is handed on as it
    arrives, and the only thing buffered whole is the index (at most
    MAX_INDEX_SIZE).

    Args:
        streams: how many streams the container must hold, if known: a
            segment for another number is Malformed at once, and so is an
            index of another size.

    Raises (from next_event):
        StreamError: as §7.5, plus Malformed for bytes after the footer and
            Truncated for an end of input before it.
    """

    def __init__(self, streams: int | None = None) -> None:
        if streams is not None and not 0 <= streams <= MAX_STREAMS:
            raise ValueError(f"streams must be 0..{MAX_STREAMS}, not {streams!r}")
        self._streams = streams
        self._buf = bytearray()
        self._eof = False
        self._state = "header"
        self.offset = 0
        """Bytes consumed so far."""
        self._segment: tuple[int, int] | None = None  # stream, bytes left
        self._bytes: dict[int, int] = {}
        self._segments: dict[int, int] = {}
        self._index_at = 0
        self._index_need = _INDEX_HEAD.size
        self._index_count = -1
        self._index_entries = 0
        self._index: list[StreamInfo] | None = None

    @property
    def ended(self) -> bool:
        """Whether the footer has been read and verified."""
        return self._state == "done"

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add the next bytes.  Raises RuntimeError after feed_eof()."""
        if self._eof:
            raise RuntimeError("ContainerReader.feed() after feed_eof()")
        self._buf += data

    def feed_eof(self) -> None:
        """The input has ended: next_event() raises Truncated if the footer has not come."""
        self._eof = True

    def next_event(self) -> SegmentData | ContainerEnd | _Sentinel:
        """Return the next piece of segment data, the end, or NEED_DATA."""
        while True:
            if self._state == "done":
                if self._buf:
                    raise Malformed(f"{len(self._buf)} bytes after the footer at {self.offset}, expected none")
                return NEED_DATA
            event = self._step()
            if event is not None:
                return event

    def _step(self) -> SegmentData | ContainerEnd | _Sentinel | None:
        state = self._state
        if state == "data":
            stream, left = self._segment
            if not self._buf:
                return self._need("segment data")
            piece = self._take(min(left, len(self._buf)))
            left -= len(piece)
            self._segment = (stream, left)
            if not left:
                self._state = "item"
            return SegmentData(stream, piece)
        if state == "header":
            if len(self._buf) < FILE_HEADER_SIZE:
                return self._need("the file header")
            parse_file_header(bytes(self._take(FILE_HEADER_SIZE)))
            self._state = "item"
            return None
        if state == "item":
            if not self._buf:
                return self._need("a segment or the index")
            if self._buf[0] == INDEX_TAG:
                self._state, self._index_at = "index", self.offset
                return None
            if len(self._buf) < SEGMENT_HEADER_SIZE:
                return self._need("a segment header")
            limit = self._streams if self._streams is not None else MAX_STREAMS
            stream, length = parse_segment_header(bytes(self._take(SEGMENT_HEADER_SIZE)), limit)
            self._bytes[stream] = self._bytes.get(stream, 0) + length
            self._segments[stream] = self._segments.get(stream, 0) + 1
            self._segment, self._state = (stream, length), "data"
            return None
        if state == "index":
            return self._step_index()
        if state == "footer":
            if len(self._buf) < FOOTER_SIZE:
                return self._need("the footer")
            raw = bytes(self._take(FOOTER_SIZE))
            offset, length = parse_footer(raw, self.offset)
            if offset != self._index_at:
                raise Corrupt(f"the footer puts the index at {offset}, but it came at {self._index_at}")
            self._state = "done"
            return self._finish()
        raise AssertionError(state)

    def _step_index(self) -> _Sentinel | None:
        # The index is read whole (it is small and bounded); its length is
        # found as it comes: the head gives the count, each entry its Id's.
        buf = self._buf
        while True:
            pos = self._index_need
            if self._index_count < 0:
                if len(buf) < _INDEX_HEAD.size:
                    return self._need("the index")
                *_, count = _INDEX_HEAD.unpack_from(buf)
                if count > MAX_STREAMS:
                    raise StreamLimitExceeded(f"index lists {count} streams, limit {MAX_STREAMS}")
                self._index_count = count
            elif self._index_entries < self._index_count:
                if len(buf) < pos + 1:
                    return self._need("the index")
                end = pos + 1 + buf[pos] + _ENTRY.size
                if end + 4 > MAX_INDEX_SIZE:
                    raise StreamLimitExceeded(f"index of more than {MAX_INDEX_SIZE} bytes")
                if len(buf) < end:
                    return self._need("the index")
                self._index_entries += 1
                self._index_need = end
            else:
                if len(buf) < pos + 4:
                    return self._need("the index")
                self._index = parse_index(bytes(self._take(pos + 4)))
                self._state = "footer"
                return None

    def _finish(self) -> ContainerEnd:
        infos = self._index or []
        if self._streams is not None and len(infos) != self._streams:
            raise Malformed(f"the index lists {len(infos)} streams, expected {self._streams}")
        for number in self._bytes:
            if number >= len(infos):
                raise Malformed(f"segments for stream {number}, but the index lists {len(infos)} (numbered from 0)")
        for number, info in enumerate(infos):
            seen = (self._bytes.get(number, 0), self._segments.get(number, 0))
            if seen != (info.stream_bytes, info.segments):
                raise Corrupt(
                    f"stream {number} ({info.backend_id!r}): {seen[0]} bytes in {seen[1]} segments, "
                    f"the index says {info.stream_bytes} in {info.segments}"
                )
        return ContainerEnd(infos, self.offset)

    def _take(self, size: int) -> bytearray:
        taken = self._buf[:size]
        del self._buf[:size]
        self.offset += size
        return taken

    def _need(self, what: str) -> _Sentinel:
        if self._eof:
            raise Truncated(f"the container ended at {self.offset + len(self._buf)} bytes, in {what}")
        return NEED_DATA
