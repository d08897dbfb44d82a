"""The migration's control messages (dbus_vmstate2.vmm.wire): pure, fed three ways."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbus_vmstate2.errors import BadMagic, Corrupt, Malformed, StreamError, StreamLimitExceeded, Truncated, UnsupportedVersion
from dbus_vmstate2.stream import NEED_DATA
from dbus_vmstate2.vmm.wire import HEAD_SIZE, Kind, Message, MessageReader, encode, hello_backends, ready_setup_seconds

HELLO = Message(Kind.HELLO, {"backends": ["fs", "net"]})
# A hand-made vector: the HELLO above (magic, kind 1, version 1, reserved,
# length 25, the JSON body, its CRC-32).
HELLO_HEX = (
    "89564d324d0d0a1a" "01" "01" "0000" "19000000"
    "7b226261636b656e6473223a5b226673222c226e6574225d7d"
    "b88748ee"
)


def messages(data: bytes, piece: int | None = None) -> list[Message]:
    reader = MessageReader()
    out = []
    for start in range(0, len(data), piece or max(1, len(data))):
        reader.feed(data[start : start + (piece or len(data))])
        while (m := reader.next_message()) is not NEED_DATA:
            out.append(m)
    return out


def test_the_hello_vector():
    assert encode(HELLO).hex() == HELLO_HEX
    assert messages(bytes.fromhex(HELLO_HEX)) == [HELLO]


@pytest.mark.parametrize("piece", [None, 1, 7])
def test_whole_bytewise_and_in_pieces(piece):
    stream = encode(HELLO) + encode(Message(Kind.READY)) + encode(Message(Kind.FAILED, {"message": "é", "error": "Corrupt"}))
    got = messages(stream, piece)
    assert [m.kind for m in got] == [Kind.HELLO, Kind.READY, Kind.FAILED]
    assert got[2].body["message"] == "é"


def test_what_follows_a_message_stays_buffered():
    reader = MessageReader()
    reader.feed(encode(Message(Kind.READY)) + b"\x89VM2F rest")
    assert reader.next_message() == Message(Kind.READY)
    assert reader.take_buffered() == b"\x89VM2F rest" and reader.buffered == 0


@pytest.mark.parametrize(
    ("mutate", "error", "words"),
    [
        (lambda r: b"SSH-2.0-OpenSSH_9.2\r\n" + r, BadMagic, "not a dbus-vmstate2 migration peer"),
        (lambda r: b"QEVM" + r, BadMagic, "not a dbus-vmstate2"),
        (lambda r: r[:9] + b"\x02" + r[10:], UnsupportedVersion, "protocol version 2"),
        (lambda r: r[:-1] + bytes([r[-1] ^ 1]), Corrupt, "CRC"),
        (lambda r: r[:8] + b"\x09" + r[9:-4] + _crc(r[:8] + b"\x09" + r[9:-4]), UnsupportedVersion, "kind 9"),
        (lambda r: r[:12] + (2 << 20).to_bytes(4, "little") + r[16:], StreamLimitExceeded, "limit"),
    ],
)
def test_bad_input_says_what(mutate, error, words):
    with pytest.raises(error, match=words):
        messages(mutate(encode(HELLO)))


def _crc(raw: bytes) -> bytes:
    from dbus_vmstate2.stream._format import crc32

    return crc32(raw).to_bytes(4, "little")


def test_a_body_that_is_not_an_object_is_malformed():
    head = bytes.fromhex("89564d324d0d0a1a01010000") + (2).to_bytes(4, "little") + b"[]"
    with pytest.raises(Malformed, match="not a JSON object"):
        messages(head + _crc(head))


def test_an_end_inside_a_message_is_truncated():
    reader = MessageReader()
    reader.feed(encode(HELLO)[:-3])
    assert reader.next_message() is NEED_DATA
    reader.feed_eof()
    with pytest.raises(Truncated):
        reader.next_message()


@pytest.mark.parametrize("ids", [None, "fs", ["fs", "fs"], ["fs", ""], [1]])
def test_a_hello_needs_distinct_ids(ids):
    with pytest.raises(Malformed):
        hello_backends(Message(Kind.HELLO, {"backends": ids}))


@pytest.mark.parametrize(("value", "seconds"), [
    (0.012, 0.012), (0, 0.0), (None, None), (-1, None), (True, None), ("0.1", None), (float("nan"), None),
    (float("inf"), None),
])  # fmt: skip
def test_readys_setup_seconds_is_optional_and_only_a_time_counts(value, seconds):
    body = {"backends": ["fs"]} if value is None else {"backends": ["fs"], "setup_seconds": value}
    assert ready_setup_seconds(Message(Kind.READY, body)) == seconds


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 40))
def test_any_input_decodes_or_raises_a_stream_error(junk, cut):
    for data in (junk, encode(HELLO)[:cut] + junk):
        try:
            messages(data, 3)
        except StreamError:
            pass
