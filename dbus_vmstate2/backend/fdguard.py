"""The message guard every fd-taking service needs on dbus-fast.

Two faults of the library are closed here, before any handler runs:

* a call whose ``h`` argument carries no fd would reach the handler as the
  raw index (0: our own stdin) since dbus-fast 5.0.19; it is refused with
  ``org.freedesktop.DBus.Error.InvalidArgs``;
* fds that arrive on a message no handler of ours takes (an unknown member,
  a wrong signature, a signal) are never closed by the library; we close
  them.

The fds of a call that *is* dispatched to one of our methods belong to that
method, which closes them on every path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection

from dbus_fast import Message, MessageType
from dbus_fast.signature import get_signature_tree

log = logging.getLogger("dbus_vmstate2.backend")

INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"


class FdGuard:
    """A ``bus.add_message_handler`` callable for the methods in ``fd_methods``.

    Args:
        path: the object path of our methods.
        interface: their interface (a call may also omit the interface).
        fd_methods: ``(member, signature)`` of every method that takes fds.
    """

    def __init__(self, path: str, interface: str, fd_methods: Collection[tuple[str, str]]) -> None:
        self._path = path
        self._interface = interface
        self._fd_methods = frozenset(fd_methods)

    def __call__(self, msg: Message) -> Message | None:
        ours = (
            msg.message_type is MessageType.METHOD_CALL
            and msg.path == self._path
            and msg.interface in (None, self._interface)
            and (msg.member, msg.signature) in self._fd_methods
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
