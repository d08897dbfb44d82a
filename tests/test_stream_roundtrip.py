"""Stream encoder/decoder: round trips, segmentation, skim mode, API contract.

Bytes are fed three ways (whole, one byte at a time, with trailing garbage),
and under hypothesis with any segmentation (STYLE.md habit 2).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbus_vmstate2.errors import LimitExceeded, Malformed, Truncated
from dbus_vmstate2.stream import (
    MAX_RECORD_SIZE,
    NEED_DATA,
    Compression,
    Record,
    RecordType,
    StreamDecoder,
    StreamEncoder,
    StreamEnd,
    StreamHeader,
    decode_stream,
    encode_stream,
)

BOTH = pytest.mark.parametrize("compression", list(Compression))


def drain(dec: StreamDecoder) -> list:
    events = []
    while (event := dec.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def feed_all(data: bytes, pieces: list[int] | None = None, **kw) -> list:
    """Decode ``data`` cut at ``pieces`` (sorted offsets); return all events."""
    dec = StreamDecoder(**kw)
    events, last = [], 0
    for cut in [*(pieces or []), len(data)]:
        dec.feed(data[last:cut])
        last = cut
        events += drain(dec)
    dec.feed_eof()
    events += drain(dec)
    return events


def sample(compression: Compression) -> tuple[bytes, list[tuple[RecordType, bytes]]]:
    recs = [
        (RecordType.DATA, b"inode table " * 500),
        (RecordType.DATA, os.urandom(3000)),
        (RecordType.END_OF_INITIAL, b""),
        (RecordType.DIRTY, b""),
        (RecordType.DIRTY, b"x" * 70000),
    ]
    return encode_stream("virtiofsd-0", recs, compression), recs


def check_events(events: list, recs: list, backend_id: str = "virtiofsd-0", payloads: bool = True) -> None:
    assert isinstance(events[0], StreamHeader) and events[0].backend_id == backend_id
    assert isinstance(events[-1], StreamEnd)
    got = events[1:-1]
    assert all(isinstance(r, Record) for r in got)
    assert [(r.seq, r.type, r.raw_size) for r in got] == [(i, t, len(p)) for i, (t, p) in enumerate(recs)]
    if payloads:
        assert [bytes(r.payload) for r in got] == [p for _, p in recs]
    else:
        assert all(r.payload is None for r in got)
    end = events[-1]
    assert end.records == len(recs) and end.raw_bytes == sum(len(p) for _, p in recs)


@BOTH
@pytest.mark.parametrize("payloads", [True, False])
def test_feed_whole_and_byte_by_byte(compression, payloads):
    data, recs = sample(compression)
    whole = feed_all(data, payloads=payloads)
    check_events(whole, recs, payloads=payloads)
    assert whole[-1].wire_bytes == len(data)
    step = 1 if compression is Compression.ZSTD else 7  # the uncompressed sample is 77 KB
    assert feed_all(data, list(range(1, len(data), step)), payloads=payloads) == whole


@BOTH
@pytest.mark.parametrize("payloads", [True, False])
def test_trailing_garbage_is_malformed(compression, payloads):
    data, _ = sample(compression)
    with pytest.raises(Malformed, match="after the stream trailer"):
        feed_all(data + b"\0", payloads=payloads)
    dec = StreamDecoder(payloads=payloads)
    dec.feed(data)
    assert isinstance(drain(dec)[-1], StreamEnd) and dec.done
    with pytest.raises(Malformed, match="after the stream trailer"):
        dec.feed(b"junk")
    with pytest.raises(Malformed):  # sticky
        dec.next_event()


def test_missing_trailer_is_truncated_only_at_eof():
    data, _ = sample(Compression.NONE)
    dec = StreamDecoder()
    dec.feed(data[:-1])
    drain(dec)  # no error yet: more may come
    dec.feed_eof()
    with pytest.raises(Truncated, match="trailer"):
        dec.next_event()


@BOTH
def test_counters_agree(compression):
    enc = StreamEncoder("a", compression)
    chunks = enc.start() + enc.record(b"abc" * 1000) + enc.record(b"", RecordType.END_OF_INITIAL) + enc.finish()
    data = b"".join(chunks)
    assert (enc.records, enc.raw_bytes, enc.wire_bytes) == (2, 3000, len(data))
    dec = StreamDecoder("a")
    dec.feed(data)
    events = drain(dec)
    assert (dec.records, dec.raw_bytes, dec.wire_bytes) == (2, 3000, len(data))
    assert events[-1].wire_bytes == len(data)


def test_uncompressed_payload_is_not_copied():
    backing = bytearray(b"device memory" * 100)
    view = memoryview(backing)
    enc = StreamEncoder("a", Compression.NONE)
    enc.start()
    chunks = enc.record(view)
    assert chunks[1].obj is backing  # a view of the caller's buffer, not a copy
    payload = b"p" * 5000
    assert enc.record(payload)[1] is payload


def test_decoder_returns_views_of_fed_bytes():
    data = encode_stream("a", [b"q" * 10000], Compression.NONE)
    dec = StreamDecoder()
    dec.feed(data)
    record = drain(dec)[1]
    assert record.payload.obj is data and record.payload.readonly


def test_decoder_copies_mutable_input():
    data = bytearray(encode_stream("a", [b"q" * 100], Compression.NONE))
    dec = StreamDecoder()
    dec.feed(data)
    data[:] = bytes(len(data))  # the caller reuses its read buffer
    assert bytes(drain(dec)[1].payload) == b"q" * 100


def test_skim_mode_with_reused_buffer():
    data = encode_stream("a", [b"q" * 100, b"r" * 100], Compression.ZSTD)
    dec, buf, events = StreamDecoder(payloads=False), bytearray(5), []
    for i in range(0, len(data), 5):
        buf[:] = data[i : i + 5].ljust(5, b"\0")
        dec.feed(memoryview(buf)[: len(data[i : i + 5])])
        events += drain(dec)
    assert isinstance(events[-1], StreamEnd) and events[-1].records == 2


def test_encoder_contract():
    enc = StreamEncoder("a", Compression.NONE)
    with pytest.raises(RuntimeError):
        enc.record(b"x")
    enc.start()
    with pytest.raises(LimitExceeded):
        enc.record(bytes(MAX_RECORD_SIZE + 1))
    with pytest.raises(ValueError):
        enc.record(b"x", RecordType.END_OF_INITIAL)
    enc.record(b"", RecordType.END_OF_INITIAL)
    with pytest.raises(ValueError):
        enc.record(b"", RecordType.END_OF_INITIAL)
    enc.finish()
    with pytest.raises(RuntimeError):
        enc.finish()
    for bad in ("", "é" * 128):
        with pytest.raises(ValueError):
            StreamEncoder(bad)
    with pytest.raises(ValueError):
        StreamEncoder("a", level=99)


def test_largest_record_round_trips():
    payload = os.urandom(1 << 16) * (MAX_RECORD_SIZE >> 16)
    for compression in Compression:
        decoded = decode_stream(encode_stream("a", [payload], compression), "a")
        assert decoded.records[0].payload == payload


def test_workers_give_the_same_records():
    payload = b"".join(b"%d inode %d\n" % (i, i * 7) for i in range(400_000))
    data = encode_stream("a", [payload[:MAX_RECORD_SIZE]], Compression.ZSTD)
    enc = StreamEncoder("a", Compression.ZSTD, workers=2)
    mt = b"".join(enc.start() + enc.record(payload[:MAX_RECORD_SIZE]) + enc.finish())
    assert decode_stream(mt).records[0].payload == decode_stream(data).records[0].payload


records_st = st.lists(
    st.tuples(st.sampled_from([RecordType.DATA, RecordType.DIRTY]), st.binary(max_size=3000)),
    max_size=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recs=records_st,
    eoi=st.none() | st.integers(min_value=0, max_value=8),
    compression=st.sampled_from(list(Compression)),
    level=st.integers(min_value=-5, max_value=5),
    backend_id=st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) <= 255 and "," not in s and "\0" not in s),
    cuts=st.lists(st.integers(min_value=0, max_value=30000), max_size=12),
    payloads=st.booleans(),
)
def test_round_trip_any_records_any_segmentation(recs, eoi, compression, level, backend_id, cuts, payloads):
    if eoi is not None:
        recs.insert(min(eoi, len(recs)), (RecordType.END_OF_INITIAL, b""))
    data = encode_stream(backend_id, recs, compression, level)
    pieces = sorted({c % (len(data) + 1) for c in cuts})
    events = feed_all(data, pieces, expected_id=backend_id, payloads=payloads)
    check_events(events, recs, backend_id, payloads)
    assert events[0].compression is compression
    assert events[0].level == (level if compression is Compression.ZSTD else 0)


def test_stream_package_does_no_io():
    import ast
    import pathlib

    import dbus_vmstate2.stream as pkg

    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"os", "socket", "asyncio", "io", "subprocess", "threading"}, path.name
