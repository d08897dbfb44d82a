"""The project's bus connections: dbus-fast's, with a writer that waits for a full socket.

dbus-fast 5.2 (like dbus-next before it, whose issue #153 describes it)
drops the whole connection when the socket is full as it sends: its writer
tries each new message at once, and counts EAGAIN as a failure.  That is
the case whenever a message is sent while a large one is still going out:
a back-end that answered ``dbus-vmstate2 status`` while its 1 MiB VMState1
Save reply was being written lost its bus (tests/test_vmstate1.py).  The
writer here is dbus-fast's own, but a full socket makes it wait for the
loop to say the socket takes more, as a non-blocking writer should.

It also fails cleanly where dbus-fast does not: a send that breaks the
socket fails the call that made it and nothing else (dbus-fast leaves an
unretrieved future that prints a traceback when collected), and a send on a
closed connection raises at once (tests/test_bus.py).

And a message whose body is one large byte array (a VMState1 blob, which
QEMU waits for in the VM's downtime) goes to the socket from the array's
own buffers: dbus-fast copies it twice first, into the body and then the
body after the header.  The array may even be given as the pieces it is
made of (:class:`SplitBytes`: a stream's headers around the daemon's own
records), which are then never joined (benchmarks/bench_inline.py).
"""

from __future__ import annotations

import array
import asyncio
import errno
import socket
import struct
from collections.abc import Iterable

from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _future_set_result, _MessageWriter

LARGE_ARRAY = 64 << 10
"""A byte array at least this large is sent from its own buffers, uncopied."""
MAX_ARRAY = 64 << 20
"""The D-Bus specification's largest array: a larger one is left to
dbus-fast's marshalling, which refuses it with its own error."""
SMALL_PIECE = 16 << 10
"""Pieces of a :class:`SplitBytes` smaller than this are joined with their
neighbours: so that a message is a few buffers, far below IOV_MAX."""
MAX_IOV = 512
"""The most buffers one sendmsg(2) is given (Linux takes 1024)."""


def unchangeable(piece: object) -> bool:
    """Whether ``piece`` is ``bytes`` or a contiguous view of ``bytes``: what
    :class:`SplitBytes` takes, as nobody can change it while it is written."""
    return type(piece) is bytes or (type(piece) is memoryview and type(piece.obj) is bytes and piece.c_contiguous)


class SplitBytes:
    """One D-Bus byte array given as the pieces it is made of, in order,
    which the project's connections send without joining them: only as the
    whole body of an ``ay`` message (a VMState1 Save's reply) on a
    connection made by :func:`open_bus`.

    Each piece must be ``bytes`` or a contiguous view of ``bytes``, which
    nobody can change while it waits to be written.  ``len()`` is the array's length,
    and ``bytes()`` joins it.

    Raises:
        TypeError: a piece is anything else.
    """

    __slots__ = ("pieces", "_size")

    def __init__(self, pieces: Iterable[bytes | memoryview]) -> None:
        joined: list[bytes | memoryview] = []
        small: list[bytes | memoryview] = []
        for piece in pieces:
            if not unchangeable(piece):
                raise TypeError(
                    f"a piece of SplitBytes must be bytes or a contiguous view of bytes, not {type(piece).__name__}"
                )
            if type(piece) is memoryview:
                piece = memoryview(piece).cast("B")  # a view of our own: the caller may release theirs
            if len(piece) < SMALL_PIECE:
                small.append(piece)
                continue
            if small:
                joined.append(b"".join(small))
                small = []
            joined.append(piece)
        if small:
            joined.append(b"".join(small))
        self.pieces = tuple(joined)
        self._size = sum(len(piece) for piece in joined)

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)


class _PatientWriter(_MessageWriter):
    """dbus-fast 5.2's ``_MessageWriter.write_callback``, but EAGAIN waits,
    and a message may be queued as several buffers (:meth:`buffer_message`)."""

    def write_callback(self, remove_writer: bool = True) -> None:
        sock = self.sock
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(self.fd)
                        return
                    buf, unix_fds, fut = self.messages.popleft()
                    self.unix_fds = unix_fds
                    self.fut = fut
                    self.buf = [memoryview(piece) for piece in buf] if type(buf) is tuple else [memoryview(buf)]
                ancdata = []
                if self.unix_fds and self.negotiate_unix_fd:
                    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                sent = sock.sendmsg(self.buf[:MAX_IOV], ancdata)
                self.unix_fds = None  # sent with the first bytes
                self.buf = _unsent(self.buf, sent)
                if self.buf:
                    return  # the rest when the loop says the socket takes more
                self.buf = None
                _future_set_result(self.fut, None)
        except BlockingIOError:
            # Full: nothing was sent (the fds neither).  Called by the loop,
            # we stay its writer; called at once by schedule_write(), it
            # makes us the writer, since a message is still pending.
            return
        except Exception as e:
            self._fail(e)

    def buffer_message(self, msg: Message, future: asyncio.Future | None = None) -> None:
        """dbus-fast's, but a body of one large byte array is queued uncopied.

        The message is marshalled with an empty array, whose length, and the
        body's in the header, are then set to the real array's; that and the
        array's own buffers are queued as one entry, written with one
        sendmsg(2) (a header sent alone would wake the bus daemon for
        nothing).  Only ``bytes`` and :class:`SplitBytes`, which nobody can
        change while they wait to be written: dbus-fast's copy made a
        mutable array safe to reuse.
        """
        body = msg.body
        data = body[0] if msg.signature == "ay" and len(body) == 1 else None
        if not isinstance(data, (bytes, SplitBytes)) or not LARGE_ARRAY <= len(data) <= MAX_ARRAY:
            if isinstance(data, SplitBytes):  # small, or too large for D-Bus: dbus-fast's way
                msg.body = [bytes(data)]
            super().buffer_message(msg, future)
            return
        pieces = data.pieces if isinstance(data, SplitBytes) else (data,)
        msg.body = [b""]
        try:
            head = bytearray(msg._marshall(self.negotiate_unix_fd))
        finally:
            msg.body = body
        # The D-Bus header's fixed part: endianness, type, flags, version,
        # body length (u32); the body is then the array's length (u32).
        order = "<" if head[0] == ord("l") else ">"
        struct.pack_into(order + "I", head, 4, 4 + len(data))
        struct.pack_into(order + "I", head, len(head) - 4, len(data))
        unix_fds = msg.unix_fds
        self.messages.append(((head, *pieces), list(unix_fds) if unix_fds else None, future))

    def _fail(self, error: Exception) -> None:
        """The socket broke: fail this send and every queued one, then the connection.

        dbus-fast's ``call()`` drops the future of its send and hears of the
        failure through its reply handler, which ``_finalize()`` fails; so a
        failed future is marked retrieved here, or its collection prints
        "Future exception was never retrieved" on stderr.  The buffer and
        the queue go too, so that ``schedule_write()`` does not then ask the
        loop to watch the closed socket's fd.
        """
        failed = [self.fut, *(fut for _, _, fut in self.messages)]
        self.messages.clear()
        self.buf = None
        for fut in failed:
            if self.bus._user_disconnect:
                _future_set_result(fut, None)
            elif fut is not None and not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: whoever awaits it still gets the error
        self.bus._finalize(error)

    def schedule_write(self, msg: Message | None = None, future: asyncio.Future | None = None) -> None:
        """dbus-fast's, but a closed connection refuses at once.

        dbus-fast would try the closed socket, then ask the loop to watch its
        fd, whose number may by then be another file's; and a call's reply
        handler, installed after the connection failed, would wait forever.
        """
        if self.bus._disconnected:
            raise BrokenPipeError(errno.EPIPE, "the connection to the bus is closed")
        super().schedule_write(msg, future)


def sends_unjoined(bus: MessageBus) -> bool:
    """Whether ``bus`` sends :class:`SplitBytes` (a connection of :func:`open_bus`
    whose writer could be replaced: see there)."""
    return isinstance(bus._writer, _PatientWriter)


def _unsent(pieces: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``pieces`` once their first ``sent`` bytes are written."""
    for i, piece in enumerate(pieces):
        if sent < len(piece):
            return [piece[sent:], *pieces[i + 1 :]]
        sent -= len(piece)
    return []


async def open_bus(address: str | None) -> MessageBus:
    """Connect to the bus at ``address`` (the session bus when None), with fd passing.

    Raises:
        whatever dbus-fast's ``connect()`` raises.
    """
    if address is None:
        bus = MessageBus(bus_type=BusType.SESSION, negotiate_unix_fd=True)
    else:
        bus = MessageBus(bus_address=address, negotiate_unix_fd=True)
    await bus.connect()
    if type(bus._writer) is _MessageWriter:  # made by connect(); its queue and state carry over
        bus._writer.__class__ = _PatientWriter
    return bus
