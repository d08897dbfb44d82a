"""Saved-file container: round trip, interleaving, atomic write, corrupt files."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import threading
import time

import pytest

from dbus_vmstate2.errors import BadMagic, Corrupt, IdMismatch, Malformed, StreamError, StreamLimitExceeded, Truncated
from dbus_vmstate2.stream import Compression, RecordType, decode_stream, encode_stream
from dbus_vmstate2.stream.container import MAX_SEGMENT_SIZE, ContainerWriter, parse_index, pack_index
from dbus_vmstate2.vmm.savefile import SaveFileReader, SaveFileWriter


def streams() -> dict[str, bytes]:
    return {
        "virtiofsd-0": encode_stream("virtiofsd-0", [b'{"ino": %d}\n' % i * 50 for i in range(30)]),
        "slirp": encode_stream("slirp", [os.urandom(5000), (RecordType.END_OF_INITIAL, b"")], Compression.NONE),
        "empty": encode_stream("empty", []),
    }


def save(path, data: dict[str, bytes], piece: int = 97, rng: random.Random | None = None) -> None:
    """Write the streams with their pieces interleaved (randomly if rng is given)."""
    rng = rng or random.Random(0)
    with SaveFileWriter(path) as w:
        numbers = {name: w.open_stream(name) for name in data}
        offsets = dict.fromkeys(data, 0)
        while pending := [n for n in data if offsets[n] < len(data[n])]:
            name = rng.choice(pending)
            size = rng.randint(1, piece)
            w.write(numbers[name], data[name][offsets[name] : offsets[name] + size])
            offsets[name] += size
        for name in data:
            w.close_stream(numbers[name])


def test_round_trip_interleaved(tmp_path):
    data, path = streams(), tmp_path / "vm.state"
    save(path, data)
    assert os.listdir(tmp_path) == ["vm.state"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    with SaveFileReader(path) as r:
        assert [i.backend_id for i in r.streams] == list(data)
        for number, (name, stream) in enumerate(data.items()):
            info = r.streams[number]
            decoded = decode_stream(stream)
            assert (info.records, info.raw_bytes, info.stream_bytes, info.digest) == (
                len(decoded.records), decoded.end.raw_bytes, len(stream), decoded.end.digest)  # fmt: skip
            assert info.compression is decoded.header.compression and info.segments > 1 or name == "empty"
            assert b"".join(r.stream_chunks(r.find(name), chunk_size=10)) == stream
        rebuilt = {n: b"" for n in data}
        for number, chunk in r.segments():
            rebuilt[r.streams[number].backend_id] += chunk
        assert rebuilt == data
        assert len(list(r.segments())) > sum(i.segments for i in r.streams) - 1


def test_parallel_writers(tmp_path):
    data = {f"b{i}": encode_stream(f"b{i}", [os.urandom(2000) for _ in range(20)]) for i in range(4)}
    path = tmp_path / "vm.state"
    with SaveFileWriter(path) as w:

        def pump(name: str) -> None:
            n = w.open_stream(name)
            for i in range(0, len(data[name]), 333):
                w.write(n, bytearray(data[name][i : i + 333]))
            w.close_stream(n)

        threads = [threading.Thread(target=pump, args=(name,)) for name in data]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with SaveFileReader(path) as r:
        assert {i.backend_id: b"".join(r.stream_chunks(r.find(i.backend_id))) for i in r.streams} == data


def test_large_writes_are_split_into_segments():
    writer = ContainerWriter()
    writer.start()
    n = writer.open_stream()
    stream = encode_stream("a", [os.urandom(16 << 20)], Compression.NONE)
    chunks = writer.write(n, stream)
    assert len(chunks) == 4 and max(len(c) for c in chunks) == MAX_SEGMENT_SIZE
    assert chunks[1].obj is stream  # segments are views, not copies


@pytest.mark.parametrize(
    "bad, error",
    [
        (lambda s: s[:-1], Truncated),  # the stream never ends
        (lambda s: s + b"x", Malformed),  # bytes after the trailer
        (lambda s: b"junk" + s, BadMagic),
        (lambda s: encode_stream("someone-else", [b"x"]), IdMismatch),
    ],
)
def test_bad_stream_aborts_the_save_and_leaves_no_file(tmp_path, bad, error):
    path = tmp_path / "vm.state"
    with pytest.raises(error), SaveFileWriter(path) as w:
        n = w.open_stream("virtiofsd-0")
        w.write(n, bad(streams()["virtiofsd-0"]))
        w.close_stream(n)
    assert os.listdir(tmp_path) == []


def test_failure_mid_write_leaves_no_file_and_keeps_an_old_one(tmp_path):
    path = tmp_path / "vm.state"
    path.write_bytes(b"previous save")
    with pytest.raises(RuntimeError, match="back-end died"), SaveFileWriter(path) as w:
        w.write(w.open_stream(), streams()["slirp"][:100])
        assert os.listdir(tmp_path) == ["vm.state"]  # the new file has no name yet (O_TMPFILE)
        raise RuntimeError("back-end died")
    assert os.listdir(tmp_path) == ["vm.state"] and path.read_bytes() == b"previous save"
    with pytest.raises(RuntimeError, match="still open"), SaveFileWriter(path) as w:
        w.open_stream()
    assert path.read_bytes() == b"previous save"


def test_duplicate_ids_are_refused(tmp_path):
    with pytest.raises(Malformed, match="duplicate"), SaveFileWriter(tmp_path / "f") as w:
        for _ in range(2):
            n = w.open_stream()
            w.write(n, streams()["slirp"])
            w.close_stream(n)
    assert os.listdir(tmp_path) == []


def read_all(path) -> None:
    with SaveFileReader(path) as r:
        for _ in r.segments():
            pass


def test_every_truncation_and_bit_flip_of_the_container_framing_is_detected(tmp_path):
    path = tmp_path / "vm.state"
    save(path, {"slirp": encode_stream("slirp", [b"s" * 10], Compression.NONE)}, piece=40)
    good = path.read_bytes()
    for n in range(len(good)):
        path.write_bytes(good[:n])
        with pytest.raises(StreamError):
            read_all(path)
    stream_bytes = set()  # offsets of stream data (checked by the stream, not the container)
    pos = 16
    while good[pos] == 0x53:
        length = int.from_bytes(good[pos + 8 : pos + 12], "little")
        stream_bytes |= set(range(pos + 16, pos + 16 + length))
        pos += 16 + length
    for bit in range(len(good) * 8):
        if bit // 8 in stream_bytes:
            continue
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bad)
        with pytest.raises(StreamError):
            read_all(path)


def test_absurd_index_sizes_are_refused(tmp_path):
    path = tmp_path / "vm.state"
    save(path, {"slirp": streams()["slirp"]})
    data = bytearray(path.read_bytes())
    import struct
    import zlib

    footer = struct.pack("<QI", 16, 0xFFFFFFFF)
    data[-24:] = footer + struct.pack("<I", zlib.crc32(footer)) + data[-8:]
    path.write_bytes(data)
    with pytest.raises(StreamLimitExceeded, match="index of 4294967295 bytes"):
        SaveFileReader(path)
    with pytest.raises(StreamError):
        parse_index(pack_index([])[:-1])


# -- §7.3 and §7.5: what each damaged or odd file is, in words -----------------------


def rewrite_index(path, infos, raw_index: bytes | None = None) -> None:
    """Put a new index (and a footer that fits it) on the saved file at ``path``."""
    import struct
    import zlib

    data = path.read_bytes()
    offset, _ = struct.unpack_from("<QI", data, len(data) - 24)
    index = raw_index if raw_index is not None else pack_index(infos)
    footer = struct.pack("<QI", offset, len(index))
    path.write_bytes(data[:offset] + index + footer + struct.pack("<I", zlib.crc32(footer)) + b"VM2FEND\n")


def reindex(raw: bytes) -> bytes:
    """``raw`` (an index without its CRC) with its CRC."""
    import struct
    import zlib

    return raw + struct.pack("<I", zlib.crc32(raw))


def one_stream_file(tmp_path):
    path = tmp_path / "vm.state"
    save(path, {"slirp": encode_stream("slirp", [b"s" * 10], Compression.NONE)}, piece=40)
    with SaveFileReader(path) as r:
        return path, r.streams[0]


def test_a_file_with_no_streams_is_valid(tmp_path):
    path = tmp_path / "none.state"
    with SaveFileWriter(path):
        pass
    with SaveFileReader(path) as r:
        assert r.streams == [] and list(r.segments()) == []


@pytest.mark.parametrize("change, words", [
    (dict(stream_bytes=0), "0 stream bytes for 1 records, expected at least 117"),
    (dict(raw_bytes=(16 << 20) + 1), "raw bytes in 1 records, expected at most 16777216 each"),
    (dict(segments=0), "0 segments for 127 bytes, expected 1..127"),
    (dict(segments=128), "128 segments for 127 bytes"),
])  # fmt: skip
def test_an_entry_that_cannot_describe_a_stream_is_malformed(tmp_path, change, words):
    import dataclasses

    path, info = one_stream_file(tmp_path)
    rewrite_index(path, [dataclasses.replace(info, **change)])
    with pytest.raises(Malformed, match="index entry 0 \\('slirp'\\) cannot describe a stream") as raised:
        SaveFileReader(path)
    assert words in str(raised.value)


def test_index_entries_with_unknown_versions_or_bad_ids_say_so_in_words(tmp_path):
    import dataclasses

    from dbus_vmstate2.errors import UnsupportedVersion

    path, info = one_stream_file(tmp_path)
    rewrite_index(path, [dataclasses.replace(info, compression=7)])
    with pytest.raises(UnsupportedVersion, match="compression method 7, expected one of 0 \\(none\\), 1 \\(zstd\\)"):
        SaveFileReader(path)
    rewrite_index(path, [dataclasses.replace(info, version=2)])
    with pytest.raises(UnsupportedVersion, match="stream format version 2, expected 1"):
        SaveFileReader(path)
    good = pack_index([info])[:-4]
    bad_id = good.replace(b"slirp", b"sl\xffrp")
    rewrite_index(path, [], reindex(bad_id))
    with pytest.raises(Malformed, match="index entry 0's Id is not valid UTF-8: byte\\(s\\) ff at offset 2") as raised:
        SaveFileReader(path)
    assert "codec" not in str(raised.value)
    rewrite_index(path, [], reindex(good + b"\0"))
    with pytest.raises(Malformed, match="1 bytes after its 1 entries"):
        SaveFileReader(path)
    rewrite_index(path, [], reindex(good[:-1]))
    with pytest.raises(Malformed, match="do not fit the index"):
        SaveFileReader(path)


def segment_header(tag=0x53, flags=0, reserved=0, stream=0, length=1) -> bytes:
    import struct
    import zlib

    body = struct.pack("<BBHII", tag, flags, reserved, stream, length)
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("header, error, words", [
    (segment_header(tag=0x54), "UnsupportedVersion", "segment tag 0x54"),
    (segment_header(flags=1), "UnsupportedVersion", "flags 0x01"),
    (segment_header(reserved=2), "UnsupportedVersion", "reserved 0x0002"),
    (segment_header(stream=1), "Malformed", "segment for stream 1, but the index lists 1"),
    (segment_header(length=0), "Malformed", "segment of 0 bytes"),
    (segment_header(length=(16 << 20) + 1), "StreamLimitExceeded", "limit 16777216"),
])  # fmt: skip
def test_segment_headers_follow_the_error_rules(header, error, words):
    from dbus_vmstate2.stream.container import parse_segment_header

    with pytest.raises(StreamError, match=words) as raised:
        parse_segment_header(header, 1)
    assert type(raised.value).__name__ == error


def test_an_index_that_differs_from_its_stream_says_which_field_in_words(tmp_path):
    import dataclasses

    from dbus_vmstate2.vmm.savefile import verify_streams

    path, info = one_stream_file(tmp_path)
    rewrite_index(path, [dataclasses.replace(info, level=3, records=2, raw_bytes=11, stream_bytes=info.stream_bytes + 28)])
    with SaveFileReader(path) as r:
        with pytest.raises(Corrupt, match="127 bytes in 5 segments, the index says 155 in 5"):
            verify_streams(r)
    rewrite_index(path, [dataclasses.replace(info, level=3, compression=Compression.ZSTD, digest=bytes(32))])
    with SaveFileReader(path) as r:
        [error] = verify_streams(r)
    assert error.startswith("Corrupt: the index entry does not match the stream: ")
    assert "compression: the index says zstd, the stream has none" in error
    assert "level: the index says 3, the stream has 0" in error
    assert "digest: the index says 0000" in error
    assert "<" not in error and "Compression." not in error


def test_the_footer_rules(tmp_path):
    import struct
    import zlib

    path, info = one_stream_file(tmp_path)
    good = path.read_bytes()

    def with_footer(offset: int, length: int) -> None:
        footer = struct.pack("<QI", offset, length)
        path.write_bytes(good[:-24] + footer + struct.pack("<I", zlib.crc32(footer)) + b"VM2FEND\n")

    offset, length = struct.unpack_from("<QI", good, len(good) - 24)
    with_footer(offset + 1, length)
    with pytest.raises(Corrupt, match="footer starts at"):
        SaveFileReader(path)
    with_footer(8, len(good) - 24 - 8)
    with pytest.raises(Malformed, match="expected it at 16 or later"):
        SaveFileReader(path)


def _cached(path, offset: int, size: int) -> bool:
    """Whether every page of ``size`` bytes at ``offset`` is in the page
    cache, by mincore(2): it reads nothing, so it starts no read-ahead (a
    read that may not wait, RWF_NOWAIT, starts one)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        start = (ctypes.c_char * len(mapped)).from_buffer(mapped)  # ACCESS_COPY: writable, so it has an address
        try:
            resident = (ctypes.c_ubyte * ((len(mapped) + page - 1) // page))()
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(len(mapped)), resident):
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del start
    return all(flag & 1 for flag in resident[offset // page : (offset + size + page - 1) // page])


def test_read_ahead_brings_a_cold_part_of_the_file_into_the_page_cache(tmp_path):
    """What `load` asks of the kernel ahead of its splice (vmm/loading.py,
    READ_AHEAD): the part asked for is read in the background; advice only,
    so asking past the end of the file is no error."""
    path = tmp_path / "vm.state"
    save(path, {"big": encode_stream("big", [os.urandom(1 << 20) for _ in range(8)], Compression.NONE)},
         piece=1 << 20)  # fmt: skip
    with SaveFileReader(path) as r:
        with open(path, "rb") as file:  # out of the page cache
            os.fsync(file.fileno())
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if _cached(path, 4 << 20, 2 << 20):
            pytest.skip("this file system keeps the file in memory (tmpfs?): it cannot be made cold")
        r.read_ahead(4 << 20, 2 << 20)
        r.read_ahead(os.path.getsize(path), 1 << 20)  # past the end: nothing to read, no error
        deadline = time.monotonic() + 10
        while not _cached(path, 4 << 20, 2 << 20) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _cached(path, 4 << 20, 2 << 20)
