"""Reading a container front to back (ContainerReader), as a migration does:
fed whole, a byte at a time and in random pieces, with garbage after it,
cut anywhere and with any byte flipped."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbus_vmstate2.errors import BadMagic, Corrupt, Malformed, StreamError, Truncated
from dbus_vmstate2.stream import NEED_DATA
from dbus_vmstate2.stream.container import ContainerEnd, ContainerReader, ContainerWriter, SegmentData

from .test_container import streams


def container(data: dict[str, bytes], piece: int = 97, seed: int = 0) -> bytes:
    """The streams interleaved in random pieces, as a live save writes them."""
    rng = random.Random(seed)
    writer = ContainerWriter()
    out = list(writer.start())
    numbers = {name: writer.open_stream(name) for name in data}
    offsets = dict.fromkeys(data, 0)
    while pending := [n for n in data if offsets[n] < len(data[n])]:
        name = rng.choice(pending)
        size = rng.randint(1, piece)
        out += writer.write(numbers[name], data[name][offsets[name] : offsets[name] + size])
        offsets[name] += size
    for name in data:
        writer.close_stream(numbers[name])
    out += writer.finish()
    return b"".join(bytes(c) for c in out)


def read(raw: bytes, pieces: list[int] | None = None, streams: int | None = None, eof: bool = True):
    """Feed ``raw`` in ``pieces``; return each stream's bytes and the end event."""
    reader = ContainerReader(streams)
    got: dict[int, bytes] = {}
    end = None
    pos = 0
    sizes = iter(pieces or [len(raw)])
    while pos < len(raw):
        size = next(sizes, len(raw))
        reader.feed(raw[pos : pos + size])
        pos += size
        while (event := reader.next_event()) is not NEED_DATA:
            if isinstance(event, SegmentData):
                assert end is None
                got[event.stream] = got.get(event.stream, b"") + bytes(event.data)
            else:
                assert isinstance(event, ContainerEnd)
                end = event
    if eof:
        reader.feed_eof()
        assert reader.next_event() is NEED_DATA
    return got, end, reader


DATA = streams()


@pytest.mark.parametrize("how", ["whole", "bytewise", "random"])
def test_reads_what_the_writer_wrote(how):
    raw = container(DATA)
    pieces = {"whole": None, "bytewise": [1] * len(raw), "random": [random.Random(1).randint(1, 300) for _ in range(len(raw))]}[how]
    got, end, reader = read(raw, pieces, streams=len(DATA))
    assert reader.ended and end.size == len(raw) == reader.offset
    assert [i.backend_id for i in end.streams] == list(DATA)
    assert {end.streams[n].backend_id: b for n, b in got.items()} == DATA


def test_garbage_after_the_footer_is_malformed():
    raw = container(DATA)
    reader = ContainerReader()
    reader.feed(raw + b"x")
    events = []
    with pytest.raises(Malformed, match="1 bytes after the footer"):
        while (event := reader.next_event()) is not NEED_DATA:
            events.append(event)
    assert isinstance(events[-1], ContainerEnd)


def test_an_empty_container_is_valid():
    writer = ContainerWriter()
    raw = b"".join(bytes(c) for c in writer.start() + writer.finish())
    got, end, _ = read(raw, streams=0)
    assert got == {} and end.streams == []


def test_the_wrong_number_of_streams_is_malformed():
    raw = container(DATA)
    with pytest.raises(Malformed, match="segment for stream 1, but the index lists 1"):
        read(raw, streams=1)
    with pytest.raises(Malformed, match="the index lists 3 streams, expected 4"):
        read(raw, streams=4)


def test_not_a_container():
    with pytest.raises(BadMagic):
        read(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(100))


def test_every_cut_is_truncated():
    raw = container({"empty": DATA["empty"], "slirp": DATA["slirp"]}, piece=2000)
    for cut in range(len(raw)):
        with pytest.raises(Truncated):
            read(raw[:cut])


def test_every_byte_flip_in_the_framing_is_detected():
    # Flipping a byte of segment data is the stream's own check (its decoder):
    # flip every byte that is not segment data.
    data = {"empty": DATA["empty"]}
    raw = container(data, piece=1 << 20)
    _, end, _ = read(raw)
    payload = range(32, 32 + end.streams[0].stream_bytes)  # one segment: header 16, segment header 16
    for at in range(len(raw)):
        if at in payload:
            continue
        flipped = bytearray(raw)
        flipped[at] ^= 0x40
        with pytest.raises(StreamError):
            read(bytes(flipped))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_any_input_reads_or_raises_only_stream_errors(junk, piece):
    raw = container(DATA)
    for candidate in (junk, raw[:40] + junk, raw[: len(raw) // 2] + junk):
        try:
            read(candidate, [piece] * len(candidate))
        except StreamError:
            pass
