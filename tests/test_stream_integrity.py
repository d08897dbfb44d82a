"""Stream decoder against bad input: test vectors, truncation, bit flips,
reordering, wrong Id, absurd lengths, decompression bombs (with a peak-memory
assertion) and a bounded fuzz run.

Longer fuzz run (a few minutes):
    VMSTATE2_FUZZ_EXAMPLES=200000 bash scripts/test.sh tests/test_stream_integrity.py -k fuzz
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbus_vmstate2.errors import (
    BadMagic,
    Corrupt,
    IdMismatch,
    Malformed,
    StreamError,
    StreamLimitExceeded,
    Truncated,
    UnsupportedVersion,
)
from dbus_vmstate2.stream import (
    NEED_DATA,
    CompressedRecord,
    Compression,
    Record,
    RecordType,
    StreamDecoder,
    _format,
    decode_stream,
    encode_stream,
)
from dbus_vmstate2.stream._format import pack_header, pack_record, pack_trailer_fields, zstd_check

# docs/stream-format.md §8: the same vectors, byte for byte.
VECTOR_EMPTY = bytes.fromhex(
    "89564d53320d0a1a0100000000000300766d307b311285ff0000000000000000"
    "0000000000000000000000000000001700000000000000a7f702b018d167b720"
    "1a62c73b221ef2d41379e7190e3099f7cad62a0fdb9d06"
)
VECTOR_NONE = bytes.fromhex(
    "89564d53320d0a1a0100000000000300766d307b311285010000000500000000"
    "000000000000000500000086a61036813e31d168656c6c6f0300000000000000"
    "0100000000000000000000000000000099f2b755020000000600000002000000"
    "0000000006000000e8988471642b3027776f726c6421ff000000000000000300"
    "0000000000000b000000000000007600000000000000395352297bd2414c4e27"
    "41286bdc96238a95e5f3c30830f2bfbbfefb5839f68f"
)
VECTOR_ZSTD = bytes.fromhex(
    "89564d53320d0a1a0100000001010300766d306ae939e8010000001700000000"
    "0000000000000019000000f6b930faa4293eab28b52ffd24176500003068656c"
    "6c6f200100994b11175eae0dff00000000000000010000000000000017000000"
    "000000004c000000000000006b45e90cf936739abe7cd00a28caeb711f6313ca"
    "9d9ba4b47f8ee2583285f3bf"
)
VECTOR_ZSTD_ITERATIVE = bytes.fromhex(
    "89564d53320d0a1a0100000001010300766d306ae939e8010000001700000000"
    "0000000000000019000000f6b930faa4293eab28b52ffd24176500003068656c"
    "6c6f200100994b11175eae0d0300000000000000010000000000000000000000"
    "0000000099f2b755020000001800000002000000000000001a000000c06d6e11"
    "96a3b0ca28b52ffd24186d000038776f726c6420210100994b11ac70a4f4ff00"
    "00000000000003000000000000002f000000000000009e000000000000008a82"
    "60c3c3b88395c05c5c0e5e305b91bfe85a47f9482cc82263a99fa20224e3"
)
VECTOR_FILE = bytes.fromhex(
    "89564d32460d0a1a01000000b78161c0530000000000000064000000c72e7484"
    "89564d53320d0a1a0100000000000300766d307b311285010000000500000000"
    "000000000000000500000086a61036813e31d168656c6c6f0300000000000000"
    "0100000000000000000000000000000099f2b755020000000600000002000000"
    "00000000530000000100000032000000277eb8a689564d53320d0a1a01000000"
    "00000300766d31ed0115f2ff0000000000000000000000000000000000000000"
    "000000170000530000000000000052000000ba89345106000000e8988471642b"
    "3027776f726c6421ff0000000000000003000000000000000b00000000000000"
    "7600000000000000395352297bd2414c4e2741286bdc96238a95e5f3c30830f2"
    "bfbbfefb5839f68f5300000001000000250000000111766b00000000009aeff2"
    "35c302b9c94f10582820ae372d5b47a32b82c04a98f838e10d8fd597ab490000"
    "000200000003766d300100000003000000000000000b00000000000000b60000"
    "00000000000200000000000000395352297bd2414c4e2741286bdc96238a95e5"
    "f3c30830f2bfbbfefb5839f68f03766d31010000000000000000000000000000"
    "0000000000570000000000000002000000000000009aeff235c302b9c94f1058"
    "2820ae372d5b47a32b82c04a98f838e10d8fd597abb071c3335d010000000000"
    "009c000000511c19ef564d3246454e440a"
)
"""§8's saved file: stream 0 is VECTOR_NONE, stream 1 an empty stream of Id vm1, cut at
100 and 50 bytes and interleaved: vm0[:100], vm1[:50], vm0[100:], vm1[50:]."""
NONE_RECORDS = [(RecordType.DATA, b"hello"), (RecordType.END_OF_INITIAL, b""), (RecordType.DIRTY, b"world!")]


def test_vectors_encode_exactly():
    assert encode_stream("vm0", [], Compression.NONE) == VECTOR_EMPTY
    assert encode_stream("vm0", NONE_RECORDS, Compression.NONE) == VECTOR_NONE


def test_vectors_decode():
    assert decode_stream(VECTOR_EMPTY, "vm0").end.records == 0
    got = decode_stream(VECTOR_NONE, "vm0")
    assert [(r.type, bytes(r.payload)) for r in got.records] == NONE_RECORDS
    assert got.end.wire_bytes == len(VECTOR_NONE)
    # header 0:23, record headers 23:51, 56:84, 84:112 (payloads 51:56, 112:118), trailer 118:182
    covered = VECTOR_NONE[:23] + VECTOR_NONE[23:51] + VECTOR_NONE[56:84] + VECTOR_NONE[84:112] + VECTOR_NONE[118:150]
    assert got.end.digest == hashlib.sha256(covered).digest() == VECTOR_NONE[150:]
    got = decode_stream(VECTOR_ZSTD, "vm0")
    assert got.header.compression is Compression.ZSTD and got.header.level == 1
    assert bytes(got.records[0].payload) == b"hello hello hello hello"


def test_the_iterative_zstd_vector_decodes_and_skims():
    got = decode_stream(VECTOR_ZSTD_ITERATIVE, "vm0")
    assert [(r.type, bytes(r.payload), r.wire_size) for r in got.records] == [
        (RecordType.DATA, b"hello hello hello hello", 25),
        (RecordType.END_OF_INITIAL, b"", 0),
        (RecordType.DIRTY, b"world world world world!", 26),
    ]
    assert (got.end.records, got.end.raw_bytes, got.end.wire_bytes) == (3, 47, len(VECTOR_ZSTD_ITERATIVE))
    skim = StreamDecoder("vm0", payloads=False)
    skim.feed(VECTOR_ZSTD_ITERATIVE)
    skim.feed_eof()
    events = []
    while (event := skim.next_event()) is not NEED_DATA:
        events.append(event)
    assert events[-1] == got.end


def test_the_saved_file_vector_is_written_exactly_and_reads_back(tmp_path):
    from dbus_vmstate2.stream.container import ContainerWriter
    from dbus_vmstate2.vmm.savefile import SaveFileReader, verify_streams

    empty_vm1 = encode_stream("vm1", [], Compression.NONE)
    writer = ContainerWriter()
    chunks = writer.start()
    vm0, vm1 = writer.open_stream("vm0"), writer.open_stream("vm1")
    for stream, data in ((vm0, VECTOR_NONE[:100]), (vm1, empty_vm1[:50]), (vm0, VECTOR_NONE[100:]), (vm1, empty_vm1[50:])):
        chunks += writer.write(stream, data)
    writer.close_stream(vm0)
    writer.close_stream(vm1)
    chunks += writer.finish()
    assert b"".join(bytes(c) for c in chunks) == VECTOR_FILE
    path = tmp_path / "vector.vmstate"
    path.write_bytes(VECTOR_FILE)
    with SaveFileReader(path) as reader:
        assert [(i.backend_id, i.records, i.raw_bytes, i.stream_bytes, i.segments) for i in reader.streams] == [
            ("vm0", 3, 11, 182, 2), ("vm1", 0, 0, 87, 2)
        ]
        assert [(n, len(data)) for n, data in reader.segments()] == [(0, 100), (1, 50), (0, 82), (1, 37)]
        assert b"".join(reader.stream_chunks(0)) == VECTOR_NONE and b"".join(reader.stream_chunks(1)) == empty_vm1
        assert verify_streams(reader) == [None, None]


SAMPLES = {
    "none": VECTOR_NONE,
    "zstd": encode_stream("vm0", [b"abc" * 50, (RecordType.END_OF_INITIAL, b""), os.urandom(40)], Compression.ZSTD),
}


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("payloads", [True, False])
def test_every_truncation_is_detected(name, payloads):
    data = SAMPLES[name]
    for n in range(len(data)):
        dec = StreamDecoder(payloads=payloads)
        dec.feed(data[:n])
        dec.feed_eof()
        with pytest.raises((Truncated, BadMagic)):  # b"" and a prefix of the magic are Truncated
            while dec.next_event() is not NEED_DATA:
                pass


@pytest.mark.parametrize("name", SAMPLES)
def test_every_single_bit_flip_is_detected(name):
    data = SAMPLES[name]
    for bit in range(len(data) * 8):
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(StreamError):
            decode_stream(bytes(bad))


def decode_deferred(data: bytes) -> list[Record]:
    """Decode with ``decompress=False``, decompressing each record as it comes."""
    dec = StreamDecoder(decompress=False)
    dec.feed(data)
    dec.feed_eof()
    records = []
    while (event := dec.next_event()) is not NEED_DATA:
        if isinstance(event, CompressedRecord):
            event = event.decompress()
        if isinstance(event, Record):
            records.append(event)
    return records


@pytest.mark.parametrize("name", ["zstd", "vector zstd"])
def test_deferred_decompression_gives_the_same_records_and_catches_every_flip(name):
    data = SAMPLES["zstd"] if name == "zstd" else VECTOR_ZSTD
    assert decode_deferred(data) == decode_stream(data).records
    for bit in range(len(data) * 8):
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(StreamError):
            decode_deferred(bytes(bad))


def test_a_deferred_frame_is_verified_by_its_decompress_not_by_the_decoder():
    # The digest covers headers only: a flip inside a frame passes the
    # decoder, trailer and all, and is caught when the record is decompressed.
    state = random.Random(3).randbytes(5000) * 3  # compresses to about 5 KB
    data = bytearray(encode_stream("vm0", [state], Compression.ZSTD))
    header = StreamDecoder()
    header.feed(bytes(data))
    at = header.next_event().size + _format.RECORD_HEADER_SIZE
    data[at + 2000] ^= 0x01  # inside the frame, past the header fields its check covers
    dec = StreamDecoder(decompress=False)
    dec.feed(bytes(data))
    dec.feed_eof()
    events = []
    while (event := dec.next_event()) is not NEED_DATA:
        events.append(event)
    [record] = [e for e in events if isinstance(e, CompressedRecord)]
    assert record.raw_size == 15000 and 5000 < record.wire_size == len(record.frame) < 15000
    assert dec.done
    with pytest.raises(Corrupt, match="record 0"):
        record.decompress()
    uncompressed = encode_stream("vm0", [b"abc"], Compression.NONE)
    assert decode_deferred(uncompressed) == decode_stream(uncompressed).records  # CRC-32 checked in the decoder


def test_skim_detects_flips_outside_payloads():
    data = VECTOR_NONE
    payload_bytes = set(range(51, 56)) | set(range(112, 118))  # "hello", "world!"
    for bit in range(len(data) * 8):
        if bit // 8 in payload_bytes:
            continue
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        dec = StreamDecoder(payloads=False)
        dec.feed(bytes(bad))
        dec.feed_eof()
        with pytest.raises(StreamError):
            while dec.next_event() is not NEED_DATA:
                pass


def test_swapped_records_are_detected():
    a, b = b"A" * 100, b"B" * 100
    data = encode_stream("vm0", [a, b], Compression.NONE)
    head, rec0, rec1, trailer = data[:23], data[23:151], data[151:279], data[279:]
    with pytest.raises(Corrupt, match="sequence number 1, expected 0"):
        decode_stream(head + rec1 + rec0 + trailer)
    # Even with renumbered headers (valid CRCs), the digest in the trailer disagrees.
    rec1_as_0 = pack_record(RecordType.DATA, 0, 100, 100, zlib_crc(b)) + b
    rec0_as_1 = pack_record(RecordType.DATA, 1, 100, 100, zlib_crc(a)) + a
    with pytest.raises(Corrupt, match="digest"):
        decode_stream(head + rec1_as_0 + rec0_as_1 + trailer)


def zlib_crc(data: bytes) -> int:
    import zlib

    return zlib.crc32(data)


def test_id_a_refused_as_id_b():
    data = encode_stream("backend-A", [b"state"])
    with pytest.raises(IdMismatch, match="'backend-A'.*'backend-B'"):
        decode_stream(data, "backend-B")
    assert decode_stream(data, "backend-A").header.backend_id == "backend-A"


def test_header_errors_say_what_was_expected():
    with pytest.raises(BadMagic, match="expected magic 89564d53320d0a1a"):
        decode_stream(b"GIF89a" + VECTOR_NONE[6:])
    v2 = bytearray(VECTOR_NONE)
    v2[8] = 2
    with pytest.raises(UnsupportedVersion, match="version 2, expected 1"):
        decode_stream(bytes(v2))
    body = bytearray(pack_header("vm0", Compression.NONE, 0)[:-4])
    body[12] = 7  # an unknown compression method, with a valid CRC
    with pytest.raises(UnsupportedVersion, match="compression method 7"):
        decode_stream(bytes(body) + struct.pack("<I", zlib_crc(body)))


def forge(records: list[tuple[int, int, bytes, int]], trailer: tuple[int, int, int] | None = None,
          compression: Compression = Compression.ZSTD) -> bytes:  # fmt: skip
    """A stream with valid CRCs and digest around arbitrary (type, raw_len, wire, check) records."""
    head = pack_header("vm0", compression, 1 if compression is Compression.ZSTD else 0)
    parts, digest = [head], hashlib.sha256(head)
    for seq, (rtype, raw_len, wire, check) in enumerate(records):
        rh = pack_record(rtype, seq, raw_len, len(wire), check)
        digest.update(rh)
        parts += [rh, wire]
    size = sum(map(len, parts))
    fields = pack_trailer_fields(*(trailer or (len(records), sum(r[1] for r in records), size)))
    digest.update(fields)
    return b"".join([*parts, fields, digest.digest()])


def test_forge_agrees_with_the_encoder():
    assert forge([(1, 5, b"hello", zlib_crc(b"hello"))], compression=Compression.NONE) == encode_stream(
        "vm0", [b"hello"], Compression.NONE, 1
    )


def test_absurd_lengths_are_refused_before_the_payload():
    head = pack_header("vm0", Compression.NONE, 0)
    for raw_len in (MAX := 16 << 20) + 1, 0xFFFFFFFF:
        dec = StreamDecoder()
        dec.feed(head + pack_record(RecordType.DATA, 0, raw_len, raw_len, 0))
        dec.next_event()
        with pytest.raises(StreamLimitExceeded, match=f"{raw_len} bytes, limit {MAX}"):
            dec.next_event()
    dec = StreamDecoder()
    dec.feed(head + pack_record(RecordType.DATA, 0, 10, 1 << 31, 0))  # wire != raw uncompressed
    dec.next_event()
    with pytest.raises(Malformed):
        dec.next_event()
    zhead = pack_header("vm0", Compression.ZSTD, 1)
    dec = StreamDecoder()
    dec.feed(zhead + pack_record(RecordType.DATA, 0, 10, 0xFFFFFFFF, 0))  # frame larger than any zstd bound
    dec.next_event()
    with pytest.raises(Malformed, match="zstd frame of 4294967295 bytes"):
        dec.next_event()
    huge_id = bytearray(head[:16])
    huge_id[14:16] = b"\xff\xff"
    with pytest.raises(StreamLimitExceeded, match="Id length 65535"):
        decode_stream(bytes(huge_id))
    for counts in [(1 << 63, 5, 54), (1, 1 << 63, 54), (1, 5, (1 << 64) - 1)]:
        with pytest.raises(Corrupt, match="trailer says"):
            decode_stream(forge([(1, 5, b"hello", zlib_crc(b"hello"))], counts, Compression.NONE))


def test_bomb_frames_are_refused():
    from dbus_vmstate2.stream._zstd import zstd

    zeros = zstd.compress(bytes(1 << 20))  # 1 MiB of zeros in a frame of a few dozen bytes
    plain = zstd.ZstdCompressor(options={zstd.CompressionParameter.checksum_flag: 1})
    frame = plain.compress(bytes(1 << 20), mode=plain.FLUSH_FRAME)
    for raw_len in (1000, (1 << 20) - 1):
        with pytest.raises(Corrupt, match=f"expected {raw_len}"):
            decode_stream(forge([(1, raw_len, frame, zstd_check(frame))]))
    with pytest.raises(Malformed, match="content checksum"):
        decode_stream(forge([(1, 1 << 20, zeros, zstd_check(zeros))]))  # no checksum flag
    wide = zstd.ZstdCompressor(options={zstd.CompressionParameter.checksum_flag: 1,
                                        zstd.CompressionParameter.window_log: 25})  # fmt: skip
    frame = wide.compress(b"x" * 1000) + wide.flush()  # streamed: the header declares a 32 MiB window
    with pytest.raises(StreamLimitExceeded, match="window of 33554432 bytes, limit 16777216"):
        decode_stream(forge([(1, 1000, frame, zstd_check(frame))]))
    ok = plain.compress(b"x" * 1000, mode=plain.FLUSH_FRAME)
    two = ok + ok
    with pytest.raises(Corrupt, match="bytes after it"):
        decode_stream(forge([(1, 1000, two, zstd_check(two))]))


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_stream_integrity import forge, zstd_check
    from dbus_vmstate2.errors import StreamError
    from dbus_vmstate2.stream import StreamDecoder, NEED_DATA, Compression
    from dbus_vmstate2.stream._format import pack_header, pack_record
    from dbus_vmstate2.stream._zstd import zstd

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    c = zstd.ZstdCompressor(options={{zstd.CompressionParameter.checksum_flag: 1}})
    zeros = memoryview(bytes(1 << 20))
    bomb = b"".join([c.compress(zeros) for _ in range({bomb_mib})] + [c.flush()])  # unknown size
    c.set_pledged_input_size({bomb_mib} << 20)
    sized = b"".join([c.compress(zeros) for _ in range({bomb_mib})] + [c.flush()])  # size in the header
    cases = [forge([(1, 16 << 20, f, zstd_check(f))]) for f in (bomb, sized)]
    never = pack_header("vm0", Compression.NONE, 0) + pack_record(1, 0, 16 << 20, 16 << 20, 0)
    base = rss()
    outcomes = []
    for data in cases:
        try:
            dec = StreamDecoder(); dec.feed(data); dec.feed_eof()
            while dec.next_event() is not NEED_DATA: pass
            outcomes.append("decoded")
        except StreamError as exc:
            outcomes.append(type(exc).__name__)
    for payloads in (True, False):  # a record that never ends: 64 MiB of junk after its header
        dec = StreamDecoder(payloads=payloads); dec.feed(never)
        try:
            for _ in range(64):
                dec.feed(bytes(1 << 20))
                while dec.next_event() is not NEED_DATA: pass
            outcomes.append("no error")
        except StreamError as exc:
            outcomes.append(type(exc).__name__)
    print(len(bomb), len(sized), rss() - base, *outcomes)
    """
)


def test_bombs_and_endless_records_stay_within_bounded_memory(tmp_path):
    bomb_mib = 512
    script = MEMORY_SCRIPT.format(root=os.getcwd(), tests=os.path.dirname(__file__), bomb_mib=bomb_mib)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    bomb_size, sized_size, growth, *outcomes = out
    assert int(bomb_size) < 64 << 10 and int(sized_size) < 64 << 10  # 512 MiB behind ~16 KiB
    assert outcomes == ["Corrupt", "Corrupt", "Corrupt", "Corrupt"]
    # About two records' worth (input chunks plus the joined or decompressed payload,
    # 2 x 16 MiB) and the zstd window, far below the 512 MiB the bombs expand to.
    assert int(growth) < 100 << 20, f"peak RSS grew by {int(growth) >> 20} MiB"


FUZZ_EXAMPLES = int(os.environ.get("VMSTATE2_FUZZ_EXAMPLES", "1500"))
SEEDS = [VECTOR_EMPTY, VECTOR_NONE, VECTOR_ZSTD, SAMPLES["zstd"]]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 400), st.sampled_from("xdi"), st.binary(min_size=1, max_size=8)),
                   max_size=6),  # fmt: skip
    cut=st.none() | st.integers(0, 400),
    payloads=st.booleans(),
    decompress=st.booleans(),
    expected=st.sampled_from([None, "vm0", "other"]),
)
def test_fuzz_decodes_or_raises_stream_error(seed, edits, cut, payloads, decompress, expected):
    data = bytearray(seed)
    for pos, op, blob in edits:
        pos %= len(data) + 1
        if op == "x":
            data[pos : pos + len(blob)] = bytes(a ^ b for a, b in zip(data[pos : pos + len(blob)], blob))
        elif op == "d":
            del data[pos : pos + len(blob)]
        else:
            data[pos:pos] = blob
    if cut is not None:
        del data[cut:]
    dec = StreamDecoder(expected, payloads=payloads, decompress=decompress)

    def drain() -> None:
        while (event := dec.next_event()) is not NEED_DATA:
            if isinstance(event, CompressedRecord):
                event.decompress()

    try:
        for i in range(0, len(data), 13):
            dec.feed(bytes(data[i : i + 13]))
            drain()
        dec.feed_eof()
        drain()
    except StreamError as exc:
        message = str(exc)
        assert "codec" not in message and "Compression." not in message and "RecordType." not in message


def test_the_spec_shows_the_same_vectors():
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "stream-format.md")) as f:
        flat = "".join(f.read().split())
    for label in ("header", "record0", "record1", "record2", "payload", "trailer", "digest"):
        flat = flat.replace(label, "")
    for vector in (VECTOR_EMPTY, VECTOR_NONE, VECTOR_ZSTD, VECTOR_ZSTD_ITERATIVE, VECTOR_FILE):
        assert vector.hex() in flat


def test_a_stream_fed_a_byte_at_a_time_costs_no_more_memory_than_its_record():
    # A SOCK_SEQPACKET socket or a slow pipe may hand over one byte per read:
    # the decoder must not keep an object per piece (it grew by ~450 bytes of
    # memory per stream byte).
    import tracemalloc

    from dbus_vmstate2.stream import NEED_DATA, Compression, Record, StreamDecoder, encode_stream

    record = bytes(range(256)) * 1024  # 256 KiB
    stream = encode_stream("tiny", [record], Compression.NONE)
    decoder = StreamDecoder("tiny")
    tracemalloc.start()
    try:
        view = memoryview(stream)
        got = []
        for i in range(len(view)):
            decoder.feed(view[i : i + 1])
            while (event := decoder.next_event()) is not NEED_DATA:
                if isinstance(event, Record):
                    got.append(len(event.payload))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    decoder.feed_eof()
    assert got == [len(record)]
    assert peak < 3 * len(record), f"peak {peak >> 10} KiB for a {len(record) >> 10} KiB record"


# -- The order of checks and the error classes (docs/stream-format.md §2, §5, §6.3, §10) --


def three_ways(data: bytes, payloads: bool = True) -> list[type[StreamError] | None]:
    """The error (or None) from ``data`` fed whole, a byte at a time, and whole with EOF late."""
    found = []
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        dec = StreamDecoder(payloads=payloads)
        try:
            for piece in pieces:
                dec.feed(piece)
                while dec.next_event() is not NEED_DATA:
                    pass
            dec.feed_eof()
            while dec.next_event() is not NEED_DATA:
                pass
            found.append(None)
        except StreamError as exc:
            found.append(type(exc))
    return found


@pytest.mark.parametrize("payloads", [True, False])
def test_a_version_field_that_has_arrived_is_judged_before_truncation(payloads):
    v2 = bytearray(VECTOR_NONE)
    v2[8] = 2
    for n in range(10, 24):  # from the version field on, with or without the rest of the header
        assert three_ways(bytes(v2[:n]), payloads) == [UnsupportedVersion, UnsupportedVersion], n
    assert three_ways(bytes(v2[:9]), payloads) == [Truncated, Truncated]
    assert three_ways(VECTOR_NONE[:10], payloads) == [Truncated, Truncated]  # version 1: waits for the rest


@pytest.mark.parametrize("payloads", [True, False])
def test_trailer_flags_are_judged_before_bytes_after_the_trailer(payloads):
    body = forge([(1, 5, b"hello", zlib_crc(b"hello"))], compression=Compression.NONE)
    flagged = bytearray(body)
    flagged[-64 + 1] = 1  # the trailer's flags; the digest covers them, so forge it again
    head_and_record = bytes(flagged[:-64])
    fields = bytes(flagged[-64:-32])
    digest = hashlib.sha256(head_and_record[:23] + head_and_record[23:51] + fields).digest()
    flagged = head_and_record + fields + digest
    assert three_ways(flagged, payloads) == [UnsupportedVersion, UnsupportedVersion]
    assert three_ways(flagged + b"x", payloads) == [UnsupportedVersion, UnsupportedVersion]
    assert three_ways(body + b"x", payloads) == [Malformed, Malformed]


def header_with_id(raw_id: bytes, compression: Compression = Compression.NONE, level: int = 0) -> bytes:
    body = pack_header("x", compression, level)[:14]
    body = body + struct.pack("<H", len(raw_id)) + raw_id
    return body + struct.pack("<I", zlib_crc(body))


def stream_with_header(head: bytes) -> bytes:
    fields = pack_trailer_fields(0, 0, len(head))
    return head + fields + hashlib.sha256(head + fields).digest()


@pytest.mark.parametrize("raw_id, words", [
    (b"vm,0", "contains a comma"),
    (b"vm\x000", "contains a NUL byte"),
    (b"vm\xff0", "is not valid UTF-8: byte(s) ff at offset 2 of 4"),
])  # fmt: skip
def test_an_id_no_backend_could_have_is_malformed_in_words(raw_id, words):
    with pytest.raises(Malformed) as raised:
        decode_stream(stream_with_header(header_with_id(raw_id)))
    assert words in str(raised.value) and "codec" not in str(raised.value)
    with pytest.raises(ValueError, match="comma or NUL"):
        encode_stream("vm,0", [])  # and the encoder never writes one


def test_the_level_is_informational_whatever_its_value():
    for compression, level in ((Compression.ZSTD, 127), (Compression.ZSTD, -128), (Compression.NONE, 9), (Compression.NONE, -1)):
        got = decode_stream(stream_with_header(header_with_id(b"vm0", compression, level)), "vm0")
        assert (got.header.compression, got.header.level, got.end.records) == (compression, level, 0)


def test_the_spec_table_of_errors_is_the_code():
    from dbus_vmstate2 import errors

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "stream-format.md")) as f:
        text = f.read()
    section = text[text.index("### 6.3 Errors") : text.index("### 6.4")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("**"):
            rows[cells[0].strip("*")] = cells[1].strip("`")
    stream_errors = {name: cls for name, cls in vars(errors).items()
                     if isinstance(cls, type) and issubclass(cls, StreamError) and cls is not StreamError}  # fmt: skip
    assert set(rows) == set(stream_errors)
    for name, suffix in rows.items():
        assert stream_errors[name].dbus_name == errors.ERROR_PREFIX + suffix, name


def test_a_window_over_the_limit_is_refused_from_the_frame_header_before_decoding():
    from dbus_vmstate2.stream._format import zstd_frame_header
    from dbus_vmstate2.stream._zstd import zstd

    for window_log, single in ((24, False), (25, False)):
        c = zstd.ZstdCompressor(options={zstd.CompressionParameter.checksum_flag: 1,
                                         zstd.CompressionParameter.window_log: window_log})  # fmt: skip
        frame = c.compress(b"y" * 3000) + c.flush()  # streamed, size unknown: the window is declared
        assert zstd_frame_header(frame, 0) == 1 << window_log
        decode = lambda f=frame: decode_stream(forge([(1, 3000, f, zstd_check(f))]))  # noqa: E731
        if window_log <= 24:
            assert bytes(decode().records[0].payload) == b"y" * 3000
        else:
            with pytest.raises(StreamLimitExceeded, match=f"window of {1 << window_log} bytes"):
                decode()
    # A single-segment frame needs a window of its content size: a header that
    # declares 32 MiB of content is refused before anything is decompressed.
    c = zstd.ZstdCompressor(options={zstd.CompressionParameter.checksum_flag: 1})
    c.set_pledged_input_size(1000)
    frame = c.compress(b"z" * 1000, mode=c.FLUSH_FRAME)
    assert frame[4] & 0x20 and frame[4] >> 6 == 1  # single segment, a 2-byte content size (+256)
    assert zstd_frame_header(frame, 0) == 1000
    big = frame[:4] + bytes([frame[4] | 0xC0]) + struct.pack("<Q", 32 << 20) + frame[7:]  # an 8-byte size
    assert zstd_frame_header(big, 0) == 32 << 20
    with pytest.raises(StreamLimitExceeded, match="window of 33554432 bytes"):
        decode_stream(forge([(1, 1000, big, zstd_check(big))]))


def test_a_saved_file_cut_into_one_byte_segments_costs_no_more_memory_than_its_record(tmp_path):
    # inspect (verify_streams) of a valid file whose stream comes a byte per
    # segment grew by some 28 bytes per stream byte before the decoder
    # gathered small pieces (259 MiB for 9 MiB).
    import tracemalloc

    from dbus_vmstate2.stream import Compression, encode_stream
    from dbus_vmstate2.vmm.savefile import SaveFileReader, SaveFileWriter, verify_streams

    record = bytes(range(256)) * 256  # 64 KiB
    stream = encode_stream("tiny", [record], Compression.NONE)
    path = tmp_path / "bytewise.vmstate"
    with SaveFileWriter(path) as writer:
        number = writer.open_stream("tiny")
        view = memoryview(stream)
        for i in range(len(view)):
            writer.write(number, view[i : i + 1])
        writer.close_stream(number)
    with SaveFileReader(path) as reader:
        assert reader.streams[0].segments == len(stream)
        tracemalloc.start()
        try:
            assert verify_streams(reader) == [None]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 3 * len(record), f"peak {peak >> 10} KiB for a {len(record) >> 10} KiB record"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=70_000), st.integers(0, 64), st.integers(0, 2**32 - 1))
def test_the_crc_is_zlibs_on_bytes_and_views(data, skip, start):
    view = memoryview(data)[skip:]
    assert _format.crc32(data) == zlib.crc32(data)
    assert _format.crc32(view) == zlib.crc32(view)
    assert _format._crc32(view, start) == zlib.crc32(view, start)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="isal is installed only where it has wheels")
def test_the_fast_crc_is_the_one_in_use_where_it_is_installed():
    from isal import isal_zlib  # not importable elsewhere

    assert _format._crc32 is isal_zlib.crc32
