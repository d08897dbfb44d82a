"""The stream encoder: records in, wire chunks out (docs/stream-format.md).

Pure code: every call returns the chunks to write, in order, and the caller
writes them (``os.writev``, ``transport.writelines``, ...).  Uncompressed
payloads are passed through untouched: the encoder only takes their length
and CRC, so a memoryview of device memory reaches the writer without a copy.
The caller must not modify a payload buffer until its chunks are written.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable

from ..errors import LimitExceeded
from ._format import (
    MAX_LEVEL,
    MAX_RECORD_SIZE,
    MIN_LEVEL,
    RECORD_HEADER_SIZE,
    TRAILER_SIZE,
    Compression,
    RecordType,
    crc32,
    pack_header,
    pack_record,
    pack_trailer_fields,
    zstd_check,
)
from ._zstd import zstd

Chunk = bytes | bytearray | memoryview


class _Phase(enum.Enum):
    NEW = "new"
    RECORDS = "records"
    DONE = "done"


class StreamEncoder:
    """Encode one back-end's state as a stream.

    Call :meth:`start` once, :meth:`record` for each record, then
    :meth:`finish` once; write every returned chunk in order.

    Args:
        backend_id: the back-end Id written into the header (1..255 bytes UTF-8).
        compression: NONE, or ZSTD (each record one zstd frame with checksum).
        level: zstd level (-128..22; 1 is fast and compresses as well as 3 on
            typical state).  Ignored (written as 0) when uncompressed.
        workers: zstd worker threads (0 = compress in the calling thread).
            Workers only speed up records of several MiB (zstd splits a frame
            into jobs of at least 512 KiB) and hurt on incompressible data.

    Raises:
        ValueError: a bad Id, level or worker count.
    """

    def __init__(
        self,
        backend_id: str,
        compression: Compression = Compression.ZSTD,
        level: int = 1,
        workers: int = 0,
    ) -> None:
        self.compression = Compression(compression)
        if self.compression is Compression.NONE:
            level = 0
        elif not MIN_LEVEL <= level <= MAX_LEVEL:
            raise ValueError(f"zstd level must be {MIN_LEVEL}..{MAX_LEVEL}, got {level}")
        if not 0 <= workers <= 256:
            raise ValueError(f"workers must be 0..256, got {workers}")
        self.backend_id = backend_id
        self.level = level
        self.workers = workers
        self._header = pack_header(backend_id, self.compression, level)
        self._digest = hashlib.sha256()
        self._compressor = None
        if self.compression is Compression.ZSTD:
            param = zstd.CompressionParameter
            self._compressor = zstd.ZstdCompressor(
                options={param.compression_level: level, param.checksum_flag: 1, param.nb_workers: workers}
            )
        self._phase = _Phase.NEW
        self._end_of_initial = False
        self.records = 0
        """Records encoded so far."""
        self.raw_bytes = 0
        """Payload bytes encoded so far, before compression."""
        self.wire_bytes = 0
        """Stream bytes returned so far (header, records and trailer)."""

    def start(self) -> list[Chunk]:
        """Begin the stream.

        Returns:
            The header chunk.

        Raises:
            RuntimeError: called twice.
        """
        self._expect(_Phase.NEW, "start")
        self._phase = _Phase.RECORDS
        self._digest.update(self._header)
        self.wire_bytes += len(self._header)
        return [self._header]

    def record(self, payload: Chunk, type: RecordType = RecordType.DATA) -> list[Chunk]:  # noqa: A002
        """Encode one record.

        Args:
            payload: any bytes-like object of at most MAX_RECORD_SIZE bytes
                (empty for END_OF_INITIAL).  Uncompressed, it is returned as a
                chunk itself, not copied.
            type: the record type.

        Returns:
            The record's chunks: its header, then its payload (if any).

        Raises:
            LimitExceeded: the payload is over MAX_RECORD_SIZE.
            ValueError: a payload on END_OF_INITIAL, or a second END_OF_INITIAL.
            RuntimeError: called before start() or after finish().
        """
        self._expect(_Phase.RECORDS, "record")
        rtype = RecordType(type)
        view = memoryview(payload)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        raw_len = view.nbytes
        if raw_len > MAX_RECORD_SIZE:
            raise LimitExceeded(f"record payload of {raw_len} bytes, limit {MAX_RECORD_SIZE}")
        if rtype is RecordType.END_OF_INITIAL:
            if raw_len:
                raise ValueError("END_OF_INITIAL carries no payload")
            if self._end_of_initial:
                raise ValueError("END_OF_INITIAL was already sent")
            self._end_of_initial = True
        body: Chunk | None
        if raw_len == 0:
            body, check = None, 0
        elif self._compressor is None:
            body = payload if isinstance(payload, (bytes, bytearray)) else view
            check = crc32(view)
        else:
            self._compressor.set_pledged_input_size(raw_len)
            body = self._compressor.compress(view, mode=zstd.ZstdCompressor.FLUSH_FRAME)
            check = zstd_check(body)
        wire_len = len(body) if body is not None else 0
        header = pack_record(rtype, self.records, raw_len, wire_len, check)
        self._digest.update(header)
        self.records += 1
        self.raw_bytes += raw_len
        self.wire_bytes += RECORD_HEADER_SIZE + wire_len
        return [header] if body is None else [header, body]

    def finish(self) -> list[Chunk]:
        """End the stream.

        Returns:
            The trailer chunk (record count, byte counts and stream digest).

        Raises:
            RuntimeError: called before start() or twice.
        """
        self._expect(_Phase.RECORDS, "finish")
        self._phase = _Phase.DONE
        fields = pack_trailer_fields(self.records, self.raw_bytes, self.wire_bytes)
        self._digest.update(fields)
        self.wire_bytes += TRAILER_SIZE
        return [fields + self._digest.digest()]

    def _expect(self, phase: _Phase, call: str) -> None:
        if self._phase is not phase:
            raise RuntimeError(f"StreamEncoder.{call}() not allowed in phase {self._phase.value}")


def encode_stream(
    backend_id: str,
    records: Iterable[Chunk | tuple[RecordType, Chunk]],
    compression: Compression = Compression.ZSTD,
    level: int = 1,
) -> bytes:
    """Encode a whole (small) stream into one bytes object.

    Args:
        backend_id: the back-end Id.
        records: payloads (as DATA records) or ``(type, payload)`` pairs.
        compression: the stream's compression.
        level: the zstd level.

    Returns:
        The complete stream.

    Raises:
        As :class:`StreamEncoder`.
    """
    enc = StreamEncoder(backend_id, compression, level)
    out = enc.start()
    for item in records:
        if isinstance(item, tuple):
            out += enc.record(item[1], item[0])
        else:
            out += enc.record(item)
    out += enc.finish()
    return b"".join(out)
