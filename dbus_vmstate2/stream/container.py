"""The saved-file container: several back-ends' streams in one file (docs/stream-format.md §7).

Layout: a file header, then segments (stream number, length, bytes) in any
interleaving, so that streams read in parallel from several pipes can be
written as they arrive, then an index (one entry per stream) and a fixed-size
footer that locates the index.  Pure code: :class:`ContainerWriter` returns
chunks to write; the ``parse_*`` functions check fixed-size parts that the
file layer (:mod:`dbus_vmstate2.vmm.savefile`) reads.

The index is derived from the streams themselves: the writer skims each
stream as it passes (:class:`StreamDecoder` with ``payloads=False``), so a
stream that is malformed, truncated or for another Id fails the save, and the
index's counts are those the stream's own trailer proved.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import BadMagic, Corrupt, StreamLimitExceeded, Truncated, UnsupportedVersion
from ._events import NEED_DATA, StreamEnd
from ._format import DIGEST_SIZE, MAX_ID_SIZE, Compression, crc32
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
        return self.raw_bytes / self.stream_bytes if self.raw_bytes else 0.0


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

    def finish(self) -> list[bytes]:
        """Return the index and the footer.

        Raises:
            RuntimeError: a stream is still open.
            Corrupt: two streams carry the same back-end Id.
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
        Corrupt: two entries carry the same Id.
    """
    ids = [i.backend_id for i in infos]
    if len(set(ids)) != len(ids):
        raise Corrupt(f"one stream per back-end Id, found duplicates in {ids}")
    parts = [_INDEX_HEAD.pack(INDEX_TAG, 0, 0, len(infos))]
    for i in infos:
        raw_id = i.backend_id.encode()
        parts += [bytes([len(raw_id)]), raw_id]
        parts.append(_ENTRY.pack(i.version, i.compression, i.level, i.records, i.raw_bytes,
                                 i.stream_bytes, i.segments, i.digest))  # fmt: skip
    body = b"".join(parts)
    return body + struct.pack("<I", crc32(body))


def parse_file_header(raw: bytes) -> None:
    """Check the 16-byte file header.

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
    """Check the 24-byte footer of a file of ``file_size`` bytes.

    Returns:
        (index offset, index length).

    Raises:
        Truncated: no footer magic (an unfinished or cut file).
        Corrupt, StreamLimitExceeded: a footer that does not fit the file.
    """
    offset, length, _crc, magic = _FOOTER.unpack(raw)
    if magic != END_MAGIC:
        raise Truncated(f"no footer: expected {END_MAGIC!r} at the end, found {magic!r} (unfinished or cut file)")
    _crc_tail(raw[:16], "footer")
    if length > MAX_INDEX_SIZE:
        raise StreamLimitExceeded(f"index of {length} bytes, limit {MAX_INDEX_SIZE}")
    if offset < FILE_HEADER_SIZE or offset + length + FOOTER_SIZE != file_size:
        raise Corrupt(f"index at {offset}+{length} does not end at the footer ({file_size - FOOTER_SIZE})")
    return offset, length


def parse_index(raw: bytes) -> list[StreamInfo]:
    """Decode and check the index.

    Raises:
        Corrupt, UnsupportedVersion, StreamLimitExceeded.
    """
    if len(raw) < _INDEX_HEAD.size + 4:
        raise Corrupt(f"index of {len(raw)} bytes, expected at least {_INDEX_HEAD.size + 4}")
    _crc_tail(raw, "index")
    tag, flags, reserved, count = _INDEX_HEAD.unpack_from(raw)
    if tag != INDEX_TAG or flags or reserved:
        raise UnsupportedVersion(f"index tag/flags {tag:#04x}/{flags:#04x}/{reserved:#06x}, expected 0x49/0/0")
    if count > MAX_STREAMS:
        raise StreamLimitExceeded(f"index lists {count} streams, limit {MAX_STREAMS}")
    pos, infos = _INDEX_HEAD.size, []
    try:
        for _ in range(count):
            n = raw[pos]
            backend_id = raw[pos + 1 : pos + 1 + n].decode()
            pos += 1 + n
            version, comp, level, *rest, digest = _ENTRY.unpack_from(raw, pos)
            pos += _ENTRY.size
            infos.append(StreamInfo(backend_id, version, Compression(comp), level, *rest, digest))
    except (IndexError, ValueError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
        raise Corrupt(f"index entry {len(infos)} is malformed: {exc}") from None
    if pos != len(raw) - 4:
        raise Corrupt(f"index has {len(raw) - 4 - pos} bytes after its {count} entries, expected 0")
    if len({i.backend_id for i in infos}) != count or any(not i.backend_id for i in infos):
        raise Corrupt("index lists an empty or duplicate back-end Id")
    assert all(len(i.digest) == DIGEST_SIZE for i in infos)
    return infos


def parse_segment_header(raw: bytes, streams: int) -> tuple[int, int]:
    """Check a 16-byte segment header in a file of ``streams`` streams.

    Returns:
        (stream number, data length).

    Raises:
        Corrupt, StreamLimitExceeded.
    """
    tag, flags, reserved, stream, length, _crc = _SEGMENT.unpack(raw)
    _crc_tail(raw, "segment header")
    if tag != SEGMENT_TAG or flags or reserved:
        raise Corrupt(f"segment tag/flags {tag:#04x}/{flags:#04x}/{reserved:#06x}, expected 0x53/0/0")
    if stream >= streams:
        raise Corrupt(f"segment for stream {stream}, the index lists {streams}")
    if not 0 < length <= MAX_SEGMENT_SIZE:
        raise StreamLimitExceeded(f"segment of {length} bytes, expected 1..{MAX_SEGMENT_SIZE}")
    return stream, length
