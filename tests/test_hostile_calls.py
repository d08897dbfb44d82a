"""Hostile D-Bus arguments against a running back-end (the memstate example):
fds that cannot carry a stream, huge and unknown options, wrong signatures,
and a hypothesis fuzzer over members, signatures, bodies and fds.

After every call: a D-Bus error with a name a caller can act on (never the
generic internal error), the back-end alive and back in ``running``, no fd
of the call left open in it, its memory bounded, and its state intact.

The fuzzer runs ``VMSTATE2_FUZZ_CALLS`` examples (default 150); for a long run:
``VMSTATE2_FUZZ_CALLS=20000 bash scripts/test.sh tests/test_hostile_calls.py -k fuzz``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import pytest
from dbus_fast import Message, MessageType, Variant

from dbus_vmstate2.errors import ErrorName
from dbus_vmstate2.examples.memstate import deterministic_state
from dbus_vmstate2.names import OBJECT_PATH, VMSTATE1, VMSTATE2
from dbus_vmstate2.stream import decode_stream
from dbus_vmstate2.vmm import connect
from dbus_vmstate2.vmm.calls import PROPERTIES

from .conftest import count_fds

SIZE, SEED = 256 << 10, 7
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
BUS_ERRORS = {
    INVALID_ARGS,
    "org.freedesktop.DBus.Error.UnknownMethod",
    "org.freedesktop.DBus.Error.UnknownInterface",
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownProperty",
    "org.freedesktop.DBus.Error.PropertyReadOnly",
    "org.freedesktop.DBus.Error.NotSupported",
}
"""What dbus-fast answers for a call that fits no method of ours."""
NAMED = BUS_ERRORS | set(ErrorName)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


class Caller:
    """One connection to the test's bus, driven from a plain (sync) test, so
    that hypothesis can run many examples against one back-end."""

    def __init__(self, address: str, destination: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.bus = self.loop.run_until_complete(connect(address))
        self.destination = destination

    def call(self, interface: str | None, member: str, signature: str = "", body: list | None = None,
             fds: Sequence[int] = ()) -> Message:  # fmt: skip
        message = Message(destination=self.destination, path=OBJECT_PATH, interface=interface, member=member,
                          signature=signature, body=body or [], unix_fds=list(fds))  # fmt: skip
        return self.loop.run_until_complete(asyncio.wait_for(self.bus.call(message), 30))

    def state(self) -> str:
        reply = self.call(PROPERTIES, "Get", "ss", [VMSTATE2, "State"])
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        return reply.body[0].value

    def outcome(self) -> Message:
        """Check, once the latest transfer has finished."""
        deadline = time.monotonic() + 30
        while True:
            reply = self.call(VMSTATE2, "Check")
            if reply.message_type is MessageType.ERROR or reply.body[1] or time.monotonic() > deadline:
                return reply
            time.sleep(0.02)

    def settle(self) -> None:
        """Bring the back-end back to ``running``, whatever a call left it in."""
        deadline = time.monotonic() + 30
        while (state := self.state()) != "running":
            assert time.monotonic() < deadline, f"the back-end stays in {state}"
            if state == "stopped":
                self.call(VMSTATE2, "Resume")
            elif state == "error":
                self.call(VMSTATE2, "Reset")
            elif state in ("pre-copy", "stop-copy", "saving", "resuming"):
                latest = self.call(VMSTATE2, "Check")
                if latest.message_type is MessageType.METHOD_RETURN and not latest.body[1]:
                    self.call(VMSTATE2, "CancelTransfer", "t", [latest.body[0]])
            time.sleep(0.02)

    def saved_state(self) -> bytes:
        """The back-end's whole state, through a real Save into a pipe."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            reply = self.call(VMSTATE2, "Save", "ha{sv}", [0, {}], [w])
        finally:
            os.close(w)
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        with os.fdopen(r, "rb") as pipe:
            data = pipe.read()
        assert self.outcome().message_type is MessageType.METHOD_RETURN
        return b"".join(r.payload for r in decode_stream(data, expected_id="hostile").records)

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.run_until_complete(self.bus.wait_for_disconnect())
        self.loop.close()


@pytest.fixture
def target(bus_address, memstate) -> Iterator[tuple[Caller, int]]:
    """A warmed-up memstate back-end, a caller, and the back-end's fd count."""
    backend = memstate("hostile", "--size", str(SIZE), "--seed", str(SEED), "--stall-timeout", "2")
    caller = Caller(bus_address, backend.unique_name)
    try:
        assert caller.saved_state() == deterministic_state(SIZE, SEED)  # warm up: threads, pipes, zstd
        yield caller, backend.process.pid
        assert backend.process.poll() is None, "the back-end died"
        caller.settle()
        assert caller.saved_state() == deterministic_state(SIZE, SEED)
    finally:
        caller.close()


def fds_settle(pid: int, expected: int) -> int:
    """The back-end's fd count, once it is back to ``expected`` (or after 5 s)."""
    deadline = time.monotonic() + 5
    while (count := count_fds(pid)) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


# fds that cannot carry a stream -----------------------------------------------------


@contextmanager
def fd_of(kind: str) -> Iterator[int]:
    """An fd of ``kind`` to send; ours is closed at the end (the back-end gets a copy)."""
    if kind == "directory":
        fd = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)
    elif kind == "O_PATH":
        fd = os.open(tempfile.gettempdir(), os.O_PATH)
    elif kind == "O_PATH file":
        fd = os.open(os.devnull, os.O_PATH)
    elif kind in ("/dev/zero", "/dev/null"):
        fd = os.open(kind, os.O_RDONLY)
    elif kind == "/dev/zero for writing":
        fd = os.open("/dev/zero", os.O_WRONLY)
    elif kind == "garbage file":
        fd = os.memfd_create("garbage")
        os.write(fd, b"GIF89a" + bytes(200))
        os.lseek(fd, 0, os.SEEK_SET)
    elif kind == "unconnected socket":
        fd = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()
    elif kind == "listening socket":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("")  # an autobound abstract address
        listener.listen()
        fd = listener.detach()
    elif kind in ("pipe, no writer", "pipe, no reader"):
        r, w = os.pipe2(os.O_CLOEXEC)
        fd, other = (r, w) if kind == "pipe, no writer" else (w, r)
        os.close(other)
    elif kind == "socket, peer closed":
        ours, theirs = socket.socketpair()
        fd = theirs.detach()
        ours.close()
    else:
        raise AssertionError(kind)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.mark.parametrize("member, kind, error, words", [
    # Refused at once: nothing starts.
    ("Load", "directory", INVALID_ARGS, "it is a directory"),
    ("Save", "directory", INVALID_ARGS, "it is a directory"),
    ("Load", "O_PATH", INVALID_ARGS, "O_PATH"),
    ("Save", "O_PATH file", INVALID_ARGS, "O_PATH"),
    ("SavePreCopy", "O_PATH file", INVALID_ARGS, "O_PATH"),
    ("Save", "/dev/zero", INVALID_ARGS, "open for reading only"),
    # Started, then ended with the stream's or the fd's own fault.
    ("Load", "/dev/zero", ErrorName.FORMAT, "not a dbus-vmstate2 stream"),
    ("Load", "/dev/null", ErrorName.TRUNCATED, "stream ended after 0 bytes"),
    ("Load", "garbage file", ErrorName.FORMAT, "not a dbus-vmstate2 stream"),
    ("Load", "pipe, no writer", ErrorName.TRUNCATED, "stream ended after 0 bytes"),
    ("Load", "socket, peer closed", ErrorName.TRUNCATED, "stream ended after 0 bytes"),
    ("Load", "unconnected socket", ErrorName.FAILED, "reading the stream failed"),
    ("Load", "listening socket", ErrorName.FAILED, "reading the stream failed"),
    ("Save", "pipe, no reader", ErrorName.FAILED, "the reader of the stream closed its end"),
    ("SavePreCopy", "pipe, no reader", ErrorName.FAILED, "the reader of the stream closed its end"),
    ("Save", "socket, peer closed", ErrorName.FAILED, "the reader of the stream closed its end"),
])  # fmt: skip
def test_an_fd_that_cannot_carry_a_stream_gets_a_named_error(target, member, kind, error, words):
    caller, pid = target
    before = count_fds(pid)
    latest = caller.call(VMSTATE2, "Check").body[0]
    with fd_of(kind) as fd:
        reply = caller.call(VMSTATE2, member, "ha{sv}", [0, {}], [fd])
    if reply.message_type is MessageType.METHOD_RETURN:  # started: the outcome says why it ended
        assert error != INVALID_ARGS, f"{member} took a {kind}"
        reply = caller.outcome()
    else:
        assert caller.call(VMSTATE2, "Check").body[0] == latest, "a refused call started a transfer"
    assert reply.message_type is MessageType.ERROR, reply.body
    assert (reply.error_name, words in reply.body[0]) == (error, True), reply.body
    assert "internal error" not in reply.body[0]
    caller.settle()
    assert fds_settle(pid, before) == before


def test_the_stream_of_a_save_to_dev_zero_or_a_regular_file_is_the_callers_business(target, tmp_path):
    """Any fd open for writing takes a Save: /dev/zero swallows it, a file keeps it."""
    caller, pid = target
    before = count_fds(pid)
    with open("/dev/zero", "wb") as sink:
        assert caller.call(VMSTATE2, "Save", "ha{sv}", [0, {}], [sink.fileno()]).message_type is MessageType.METHOD_RETURN
        assert caller.outcome().message_type is MessageType.METHOD_RETURN
    with open(tmp_path / "saved", "w+b") as file:
        assert caller.call(VMSTATE2, "Save", "ha{sv}", [0, {}], [file.fileno()]).message_type is MessageType.METHOD_RETURN
        assert caller.outcome().message_type is MessageType.METHOD_RETURN
    stream = (tmp_path / "saved").read_bytes()
    assert b"".join(r.payload for r in decode_stream(stream, "hostile").records) == deterministic_state(SIZE, SEED)
    assert fds_settle(pid, before) == before


# huge and unknown options -------------------------------------------------------------

HUGE = 1 << 20


@pytest.mark.parametrize("member, options, words", [
    ("Save", {"x" * HUGE: Variant("b", True)}, "unknown Save options: 'xxxx"),
    ("Save", {f"option{i}": Variant("b", True) for i in range(50_000)}, "and 49995 more"),
    ("Save", {"compression": Variant("s", "z" * HUGE)}, f"({HUGE} characters)"),
    ("Save", {"level": Variant("s", "z" * HUGE)}, "level must be of D-Bus type 'i', got 's'"),
    ("Load", {"y" * HUGE: Variant("ay", b"y" * HUGE)}, "unknown Load options: 'yyyy"),
    ("Load", {"commit": Variant("s", "z" * HUGE)}, f"({HUGE} characters)"),
    ("Load", {f"option{i}": Variant("s", "") for i in range(50_000)}, "and 49995 more"),
])  # fmt: skip
def test_huge_and_unknown_options_get_a_short_named_refusal(target, member, options, words):
    """The refusal quotes a little of what was sent: a caller that sends
    megabytes gets back, and leaves in the back-end's log, a short line."""
    caller, pid = target
    before, rss_before = count_fds(pid), rss_kib(pid)
    r, w = os.pipe2(os.O_CLOEXEC)
    theirs = w if member == "Save" else r
    try:
        reply = caller.call(VMSTATE2, member, "ha{sv}", [0, options], [theirs])
    finally:
        os.close(r)
        os.close(w)
    assert (reply.message_type, reply.error_name) == (MessageType.ERROR, ErrorName.UNSUPPORTED), reply.body
    assert words in reply.body[0] and len(reply.body[0]) < 1024, reply.body[0][:300]
    assert caller.state() == "running"
    assert fds_settle(pid, before) == before
    # The message's objects are freed: what stays is the allocator's slack.
    assert rss_kib(pid) - rss_before < 32 << 10


@pytest.mark.parametrize("member, signature, body", [
    ("Save", "", []),
    ("Save", "h", [0]),
    ("Save", "sa{sv}", ["fd", {}]),
    ("Save", "ha{ss}", [0, {"compression": "none"}]),
    ("Save", "ha{sv}u", [0, {}, 1]),
    ("Save", "ia{sv}", [0, {}]),
    ("Load", "hh", [0, 1]),
    ("StopCopy", "s", ["1"]),
    ("CancelTransfer", "", []),
    ("Reset", "t", [1]),
])  # fmt: skip
def test_a_wrong_signature_is_unknown_and_its_fds_are_closed(target, member, signature, body):
    caller, pid = target
    before = count_fds(pid)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        reply = caller.call(VMSTATE2, member, signature, body, [r, w])
    finally:
        os.close(r)
        os.close(w)
    assert (reply.message_type, reply.error_name) == (MessageType.ERROR, "org.freedesktop.DBus.Error.UnknownMethod")
    assert caller.state() == "running"
    assert fds_settle(pid, before) == before


# the fuzzer ---------------------------------------------------------------------------

FUZZ_CALLS = int(os.environ.get("VMSTATE2_FUZZ_CALLS", "150"))

FD_KINDS = ["pipe, no writer", "pipe, no reader", "/dev/zero", "/dev/null", "/dev/zero for writing", "directory",
            "O_PATH", "garbage file", "socket, peer closed", "unconnected socket"]  # fmt: skip
MEMBERS = {
    VMSTATE2: ["Save", "SavePreCopy", "Load", "StopCopy", "Resume", "Pending", "Check", "Cancel", "CancelTransfer",
               "Reset", "Bogus"],
    VMSTATE1: ["Save", "Load"],
    PROPERTIES: ["Get", "GetAll", "Set"],
    "org.example.Nothing": ["Save"],
    None: ["Save", "Load", "Check", "Reset"],
}  # fmt: skip


def test_fuzz_method_arguments(target):
    """Any member, signature, body and fds: a named error or a reply; never a
    crash, an internal error, a leaked fd or a lost state."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    caller, pid = target
    baseline_fds, baseline_rss = count_fds(pid), rss_kib(pid)

    # D-Bus strings are UTF-8 without NUL: anything else never leaves the caller.
    text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40) | st.sampled_from(["compression", "level", "workers", "zstd", "none", "lz4", VMSTATE2,
                                                   "State", "Id", "Capabilities"])  # fmt: skip
    basic: dict[str, st.SearchStrategy] = {
        "y": st.integers(0, 255), "b": st.booleans(), "n": st.integers(-(1 << 15), (1 << 15) - 1),
        "q": st.integers(0, (1 << 16) - 1), "i": st.integers(-(1 << 31), (1 << 31) - 1),
        "u": st.integers(0, (1 << 32) - 1), "x": st.integers(-(1 << 63), (1 << 63) - 1),
        "t": st.integers(0, 3) | st.integers(0, (1 << 64) - 1), "d": st.floats(allow_nan=False), "s": text,
        "o": st.just("/org/qemu/VMState1"), "g": st.sampled_from(["", "s", "a{sv}"]), "h": st.integers(0, 3),
    }  # fmt: skip
    variant = st.one_of(*[values.map(lambda v, c=code: Variant(c, v)) for code, values in basic.items() if code != "h"])
    containers: dict[str, st.SearchStrategy] = {
        "a{sv}": st.dictionaries(text, variant, max_size=6),
        "ay": st.binary(max_size=300),
        "as": st.lists(text, max_size=4),
        "v": variant,
    }
    codes = {**basic, **containers}
    signatures = st.sampled_from(["", "ha{sv}", "ha{sv}", "t", "ss", "ssv", "ay", "h", "hh"]) | st.lists(
        st.sampled_from(sorted(codes)), max_size=3
    ).map("".join)

    options = st.dictionaries(text, variant, max_size=4) | st.fixed_dictionaries(
        {}, optional={"compression": variant | st.sampled_from(["zstd", "none"]).map(lambda v: Variant("s", v)),
                      "level": variant | st.integers(-130, 25).map(lambda v: Variant("i", v)),
                      "workers": variant | st.integers(0, 300).map(lambda v: Variant("u", v))},
    )  # fmt: skip

    @st.composite
    def fd_calls(draw: Callable) -> tuple:
        """Save, SavePreCopy or Load as a VMM calls them, with any fd and options."""
        kinds = draw(st.lists(st.sampled_from(FD_KINDS), max_size=2))
        member = draw(st.sampled_from(["Save", "SavePreCopy", "Load"]))
        index = draw(st.integers(0, len(kinds)))  # len(kinds): an h that names no fd
        return draw(st.sampled_from([VMSTATE2, None])), member, "ha{sv}", [index, draw(options)], kinds

    @st.composite
    def any_calls(draw: Callable) -> tuple:
        interface = draw(st.sampled_from(list(MEMBERS)))
        member = draw(st.sampled_from(MEMBERS[interface]))
        tokens = _split(draw(signatures), codes)
        body = [draw(codes[token]) for token in tokens]
        kinds = draw(st.lists(st.sampled_from(FD_KINDS), max_size=3))
        return interface, member, "".join(tokens), body, kinds

    calls = fd_calls() | any_calls()

    @settings(max_examples=FUZZ_CALLS, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(call=calls)
    def run(call: tuple) -> None:
        tried.append(call[1])
        interface, member, signature, body, kinds = call
        with _fds(kinds) as fds:
            reply = caller.call(interface, member, signature, body, fds)
        if reply.message_type is MessageType.ERROR:
            assert reply.error_name in NAMED, (call, reply.error_name, reply.body)
            assert "internal error" not in str(reply.body[:1]), (call, reply.body)
        caller.settle()
        assert fds_settle(pid, baseline_fds) == baseline_fds, call

    tried: list[str] = []
    started = time.monotonic()
    run()
    grown = rss_kib(pid) - baseline_rss
    # The figures of a long run (pytest -s shows them).
    print(f"fuzzed {len(tried)} calls in {time.monotonic() - started:.0f} s; the back-end's RSS grew by {grown} KiB, "
          f"its peak is {rss_kib(pid, 'VmHWM')} KiB")  # fmt: skip
    assert grown < 64 << 10


def _split(signature: str, codes: dict) -> list[str]:
    """``signature`` cut into the complete types of ``codes``."""
    tokens, rest = [], signature
    while rest:
        token = next(c for c in sorted(codes, key=len, reverse=True) if rest.startswith(c))
        tokens.append(token)
        rest = rest[len(token) :]
    return tokens


@contextmanager
def _fds(kinds: list[str]) -> Iterator[list[int]]:
    with ExitStack() as stack:
        yield [stack.enter_context(fd_of(kind)) for kind in kinds]
