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
"""

from __future__ import annotations

import array
import asyncio
import errno
import socket

from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _future_set_result, _MessageWriter


class _PatientWriter(_MessageWriter):
    """dbus-fast 5.2's ``_MessageWriter.write_callback``, but EAGAIN waits."""

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
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                if self.unix_fds and self.negotiate_unix_fd:
                    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                    self.offset += sock.sendmsg([self.buf[self.offset :]], ancdata)
                    self.unix_fds = None  # sent with the first bytes
                else:
                    self.offset += sock.send(self.buf[self.offset :])
                if self.offset < len(self.buf):
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
