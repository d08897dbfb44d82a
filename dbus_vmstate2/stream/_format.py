"""Byte layouts, limits and enums of the stream format (docs/stream-format.md).

Everything here is a constant or a small pure function that packs or checks
one fixed-size structure; the encoder and decoder hold the state.  All
integers are little-endian.
"""

from __future__ import annotations

import enum
import struct

try:
    # ISA-L's CRC-32 (carry-less multiplication): the same function as
    # zlib's, four times as fast here (0.09 against 0.36 ms per MiB), and like
    # it, it lets other threads run.  Every uncompressed payload is checked
    # with it, as is VMState1's inline blob inside QEMU's downtime.
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # a platform without its wheel: zlib's
    from zlib import crc32 as _crc32

from ..errors import BadMagic, Corrupt, Malformed, StreamLimitExceeded, UnsupportedVersion

# §2 Stream header -----------------------------------------------------------
MAGIC = b"\x89VMS2\r\n\x1a"
"""The 8 bytes every stream starts with (PNG-style: high bit, CR LF, ^Z)."""

FORMAT_VERSION = 1
"""The only stream format version this code writes and reads."""

MAX_ID_SIZE = 255
"""Largest back-end Id, in bytes of UTF-8."""

_HEADER_FIXED = struct.Struct("<8sHHBbH")  # magic version flags compression level id_len
HEADER_FIXED_SIZE = _HEADER_FIXED.size  # 16
VERSION_END = 10
"""Bytes of the header up to and including its version field: a reader
judges the version as soon as they have arrived (§2)."""
MAX_HEADER_SIZE = HEADER_FIXED_SIZE + MAX_ID_SIZE + 4
"""Largest stream header in bytes (275)."""

# §3 Records ---------------------------------------------------------------
MAX_RECORD_SIZE = 16 << 20
"""Largest record payload (16 MiB): see docs/stream-format.md §6 for why."""

_RECORD = struct.Struct("<BBHIQIII")  # type flags reserved raw_len seq wire_len check crc
RECORD_HEADER_SIZE = _RECORD.size  # 28

# §5 Trailer -----------------------------------------------------------------
_TRAILER = struct.Struct("<BBHIQQQ32s")  # type flags reserved reserved count raw wire digest
TRAILER_SIZE = _TRAILER.size  # 64
TRAILER_TYPE = 0xFF
DIGEST_SIZE = 32

# §4 zstd --------------------------------------------------------------------
WINDOW_LOG_MAX = 24
"""Largest zstd window a reader accepts (2^24 = 16 MiB = MAX_RECORD_SIZE)."""

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MIN_LEVEL, MAX_LEVEL = -128, 22


def zstd_bound(size: int) -> int:
    """Largest zstd frame for ``size`` input bytes (libzstd ZSTD_COMPRESSBOUND)."""
    margin = ((128 << 10) - size) >> 11 if size < (128 << 10) else 0
    return size + (size >> 8) + margin


class Compression(enum.IntEnum):
    """How record payloads are compressed; one per stream, in the header."""

    NONE = 0
    ZSTD = 1


class RecordType(enum.IntEnum):
    """What a record carries (§3.1).  0 and 0xFF are never record types."""

    DATA = 1
    """Initial device data."""
    DIRTY = 2
    """Data sent again because it changed during pre-copy."""
    END_OF_INITIAL = 3
    """Marker: all initial data has been sent.  Empty payload, at most once."""


def crc32(data: bytes | memoryview) -> int:
    """CRC-32 (ISO-HDLC, as zlib) of ``data``."""
    return _crc32(data)


ZSTD_HEADER_MAX = 18
"""Largest zstd frame header: magic 4, descriptor 1, window 1, dictionary 4, size 8."""


def zstd_check(frame: bytes | memoryview) -> int:
    """The record check of a zstd frame (§4.2): CRC-32 of its first 18 and last 4 bytes.

    zstd verifies the content against the frame's own XXH64 checksum (the last
    4 bytes); this CRC covers that checksum and the frame header fields zstd
    might not notice a flip in (the unused descriptor bit, the window size).
    """
    return _crc32(frame[-4:], _crc32(frame[:ZSTD_HEADER_MAX]))


ZSTD_DESCRIPTOR_MUST = 0x04
"""Frame_Header_Descriptor bit that must be set: Content_Checksum_flag."""
ZSTD_DESCRIPTOR_MUST_NOT = 0x1B
"""Frame_Header_Descriptor bits that must be clear: unused (0x10), reserved (0x08), Dictionary_ID_flag (0x03)."""


def zstd_frame_header(frame: bytes | memoryview, seq: int) -> int:
    """Check a record's zstd frame header against §4 and return the window it needs.

    The window is RFC 8878's Window_Size, or Frame_Content_Size for a
    single-segment frame, whatever libzstd would do with it: the reader
    compares it with 2^WINDOW_LOG_MAX before decompressing anything.

    Raises:
        Malformed: no zstd magic, a descriptor bit that §4 forbids or
            requires, or a frame shorter than its own header.
    """
    if frame[:4] != ZSTD_MAGIC:
        raise Malformed(f"record {seq}: payload starts with {bytes(frame[:4]).hex()}, expected the zstd magic {ZSTD_MAGIC.hex()}")
    if len(frame) < 5:
        raise Malformed(f"record {seq}: zstd frame of {len(frame)} bytes ends inside its header")
    fhd = frame[4]
    if fhd & ZSTD_DESCRIPTOR_MUST_NOT or not fhd & ZSTD_DESCRIPTOR_MUST:
        raise Malformed(
            f"record {seq}: zstd frame descriptor {fhd:#04x}: expected the content checksum bit (0x04) set "
            "and the unused, reserved and dictionary bits (0x1b) clear"
        )
    single_segment = fhd & 0x20
    fcs_size = {0: 1 if single_segment else 0, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    header = 5 + (0 if single_segment else 1) + fcs_size
    if len(frame) < header:
        raise Malformed(f"record {seq}: zstd frame of {len(frame)} bytes ends inside its {header}-byte header")
    if not single_segment:
        descriptor = frame[5]
        window_log = 10 + (descriptor >> 3)
        return (1 << window_log) + ((1 << window_log) >> 3) * (descriptor & 7)
    content = int.from_bytes(frame[5 : 5 + fcs_size], "little")
    return content + 256 if fcs_size == 2 else content


def pack_header(backend_id: str, compression: Compression, level: int) -> bytes:
    """Build a stream header (§2).

    Raises:
        ValueError: the Id is empty, too long, or holds a comma or NUL, or
            the level does not fit.
    """
    raw_id = backend_id.encode("utf-8")
    if not 0 < len(raw_id) <= MAX_ID_SIZE:
        raise ValueError(f"back-end Id must be 1..{MAX_ID_SIZE} bytes of UTF-8, got {len(raw_id)}")
    if b"," in raw_id or b"\0" in raw_id:
        raise ValueError(f"back-end Id may not contain a comma or NUL: {backend_id!r}")
    body = _HEADER_FIXED.pack(MAGIC, FORMAT_VERSION, 0, compression, level, len(raw_id)) + raw_id
    return body + struct.pack("<I", crc32(body))


def check_magic(prefix: bytes) -> None:
    """Raise BadMagic unless ``prefix`` (any length) agrees with MAGIC so far."""
    n = min(len(prefix), len(MAGIC))
    if prefix[:n] != MAGIC[:n]:
        raise BadMagic(f"not a dbus-vmstate2 stream: expected magic {MAGIC.hex()}, found {prefix[:8].hex()}")


def check_version(prefix: bytes) -> None:
    """Check the version field of a header prefix of at least 10 bytes (§2 step 2).

    Raises:
        UnsupportedVersion: a version other than 1.
    """
    (version,) = struct.unpack_from("<H", prefix, 8)
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"stream format version {version}, expected {FORMAT_VERSION}")


def header_size(fixed: bytes) -> int:
    """Check the fixed 16 header bytes; return the whole header's size.

    Raises:
        BadMagic, UnsupportedVersion, StreamLimitExceeded.
    """
    magic, _version, _flags, _comp, _level, id_len = _HEADER_FIXED.unpack(fixed)
    check_magic(magic)
    check_version(fixed)
    if not 0 < id_len <= MAX_ID_SIZE:
        raise StreamLimitExceeded(f"header Id length {id_len}, expected 1..{MAX_ID_SIZE}")
    return HEADER_FIXED_SIZE + id_len + 4


def parse_header(raw: bytes) -> tuple[str, Compression, int]:
    """Verify a whole header; return (Id, compression, level).

    Raises:
        Corrupt: the CRC is wrong.
        UnsupportedVersion: unknown flags or compression method.
        Malformed: the Id is not UTF-8, or holds a comma or NUL.
    """
    (found,) = struct.unpack_from("<I", raw, len(raw) - 4)
    want = crc32(raw[:-4])
    if found != want:
        raise Corrupt(f"stream header CRC {found:#010x}, expected {want:#010x}")
    _magic, _version, flags, comp, level, _id_len = _HEADER_FIXED.unpack_from(raw)
    if flags:
        raise UnsupportedVersion(f"stream header flags {flags:#06x}, expected 0")
    try:
        compression = Compression(comp)
    except ValueError:
        raise UnsupportedVersion(f"compression method {comp}, expected one of {[int(c) for c in Compression]}") from None
    backend_id = decode_id(raw[HEADER_FIXED_SIZE:-4], "stream header Id")
    return backend_id, compression, level


def decode_id(raw: bytes, what: str) -> str:
    """Decode a back-end Id (§2): UTF-8, with no comma and no NUL.

    Raises:
        Malformed: anything else, said in words.
    """
    try:
        backend_id = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.end].hex(" ")
        raise Malformed(f"{what} is not valid UTF-8: byte(s) {bad} at offset {exc.start} of {len(raw)}") from None
    for char, name in ((",", "a comma"), ("\0", "a NUL byte")):
        if char in backend_id:
            raise Malformed(f"{what} {backend_id!r} contains {name}, which no back-end Id may hold")
    return backend_id


def pack_record(rtype: int, seq: int, raw_len: int, wire_len: int, check: int) -> bytes:
    """Build one record header (§3) with its CRC."""
    body = _RECORD.pack(rtype, 0, 0, raw_len, seq, wire_len, check, 0)[:-4]
    return body + struct.pack("<I", crc32(body))


def parse_record(raw: bytes, seq: int, compression: Compression) -> tuple[RecordType, int, int, int]:
    """Verify a 28-byte record header; return (type, raw_len, wire_len, check).

    Args:
        raw: the header bytes.
        seq: the sequence number this record must have.
        compression: the stream's method, which fixes how lengths relate.

    Raises:
        Corrupt: the CRC or the sequence number is wrong.
        UnsupportedVersion: unknown record type or flags (the CRC was right).
        StreamLimitExceeded: raw_len over MAX_RECORD_SIZE.
        Malformed: lengths or check that break §3.3 (the CRC was right).
    """
    rtype, flags, reserved, raw_len, found_seq, wire_len, check, crc = _RECORD.unpack(raw)
    want = crc32(raw[:-4])
    if crc != want:
        raise Corrupt(f"record {seq}: header CRC {crc:#010x}, expected {want:#010x}")
    try:
        rtype = RecordType(rtype)
    except ValueError:
        raise UnsupportedVersion(f"record {seq}: unknown record type {rtype:#04x}") from None
    if flags or reserved:
        raise UnsupportedVersion(f"record {seq}: flags {flags:#04x}/{reserved:#06x}, expected 0")
    if found_seq != seq:
        raise Corrupt(f"record sequence number {found_seq}, expected {seq} (reordered or lost records)")
    if raw_len > MAX_RECORD_SIZE:
        raise StreamLimitExceeded(f"record {seq}: payload of {raw_len} bytes, limit {MAX_RECORD_SIZE}")
    if rtype is RecordType.END_OF_INITIAL and raw_len:
        raise Malformed(f"record {seq}: END_OF_INITIAL with {raw_len} payload bytes, expected 0")
    if compression is Compression.NONE or raw_len == 0:
        if wire_len != raw_len:
            raise Malformed(f"record {seq}: {wire_len} bytes on the wire for {raw_len} raw, expected equal")
    elif not 0 < wire_len <= zstd_bound(raw_len):
        raise Malformed(f"record {seq}: zstd frame of {wire_len} bytes for {raw_len} raw, expected 1..{zstd_bound(raw_len)}")
    if raw_len == 0 and check:
        raise Malformed(f"record {seq}: check {check:#010x} on an empty payload, expected 0")
    return rtype, raw_len, wire_len, check


def pack_trailer_fields(records: int, raw_bytes: int, wire_bytes: int) -> bytes:
    """The first 32 trailer bytes (§5), which the digest also covers."""
    return _TRAILER.pack(TRAILER_TYPE, 0, 0, 0, records, raw_bytes, wire_bytes, b"")[:32]


def parse_trailer(raw: bytes) -> tuple[int, int, int, int, bytes]:
    """Split a 64-byte trailer; return (nonzero reserved, records, raw, wire, digest)."""
    _t, flags, res16, res32, records, raw_bytes, wire_bytes, digest = _TRAILER.unpack(raw)
    return flags | res16 | res32, records, raw_bytes, wire_bytes, digest
