"""The message guard every fd-taking service needs on dbus-fast.

Two faults of the library are closed here, before any handler runs, and
one of the caller's:

* a call whose ``h`` argument carries no fd would reach the handler as the
  raw index (0: our own stdin) since dbus-fast 5.0.19; it is refused with
  ``org.freedesktop.DBus.Error.InvalidArgs``;
* an fd open the wrong way for its method (the read end of a pipe handed to
  Save, which would fail its first write, or the write end to Load), a
  directory or an O_PATH fd is refused the same way, before anything starts;
* fds that arrive on a message no handler of ours takes (an unknown member,
  a wrong signature, a signal) are never closed by the library; we close
  them.

The fds of a call that *is* dispatched to one of our methods belong to that
method, which closes them on every path.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from collections.abc import Collection

from dbus_fast import Message, MessageType
from dbus_fast.signature import get_signature_tree

log = logging.getLogger("dbus_vmstate2.backend")

INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"


READ, WRITE = "reading", "writing"
"""What a method does with its fds (see :class:`FdGuard`)."""


class FdGuard:
    """A ``bus.add_message_handler`` callable for the methods in ``fd_methods``.

    Args:
        path: the object path of our methods.
        interface: their interface (a call may also omit the interface).
        fd_methods: ``(member, signature, use)`` of every method that takes
            fds, ``use`` being READ or WRITE: what the method does with them.
    """

    def __init__(self, path: str, interface: str, fd_methods: Collection[tuple[str, str, str]]) -> None:
        self._path = path
        self._interface = interface
        self._uses = {(member, signature): use for member, signature, use in fd_methods}

    def __call__(self, msg: Message) -> Message | None:
        ours = (
            msg.message_type is MessageType.METHOD_CALL
            and msg.path == self._path
            and msg.interface in (None, self._interface)
            and (msg.member, msg.signature) in self._uses
        )
        if not ours:
            if msg.unix_fds:
                self._close(msg, "it is not for a method that takes fds")
            return None
        tokens = [t.token for t in get_signature_tree(msg.signature).types]
        indexes = [msg.body[i] for i, token in enumerate(tokens) if token == "h"]
        if any(not 0 <= index < len(msg.unix_fds) for index in indexes):
            self._close(msg, "its h arguments carry no fd", keep=())
            return Message.new_error(
                msg, INVALID_ARGS, f"{msg.member} needs a file descriptor in its h argument, and the call carries none"
            )
        use = self._uses[(msg.member, msg.signature)]
        for index in indexes:
            wrong = _wrong_way(msg.unix_fds[index], use)
            if wrong:
                self._close(msg, "an fd is open the wrong way", keep=())
                return Message.new_error(msg, INVALID_ARGS, f"{msg.member} needs its fd open for {use}, but {wrong}")
        # Extra fds that no h argument names would never be seen again.
        self._close(msg, "no h argument names them", keep=indexes)
        return None

    @staticmethod
    def _close(msg: Message, why: str, keep: Collection[int] = ()) -> None:
        closed = 0
        for index, fd in enumerate(msg.unix_fds):
            if index in keep:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
            closed += 1
        if closed:
            log.warning("closed %d fd(s) sent by %s with %s.%s: %s", closed, msg.sender, msg.interface, msg.member, why)


def _wrong_way(fd: int, use: str) -> str:
    """Why ``fd`` cannot serve for ``use``, in words; empty if it can."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
    except OSError as exc:
        return f"it cannot be used ({exc.strerror})"
    # Neither can ever carry a stream, and an O_PATH fd cannot even be made
    # non-blocking: refused here, they would fail later as an internal error
    # (O_PATH) or a read error (a directory) after a transfer had started.
    if flags & getattr(os, "O_PATH", 0):
        return "it was opened with O_PATH, so it can be neither read nor written"
    if kind == stat.S_IFDIR:
        return "it is a directory"
    mode = flags & os.O_ACCMODE
    fifo = kind == stat.S_IFIFO
    if mode == os.O_RDWR or mode == (os.O_RDONLY if use == READ else os.O_WRONLY):
        return ""
    other = WRITE if use == READ else READ
    if fifo:
        end = "write" if use == READ else "read"
        return f"it is the {end} end of a pipe (open for {other} only): pass the other end"
    return f"it is open for {other} only"
