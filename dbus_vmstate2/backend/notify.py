"""systemd's readiness protocol (sd_notify(3)), with the standard library only.

A service of ``Type=notify`` tells systemd that it is ready by sending the
datagram ``READY=1`` to the AF_UNIX socket named in ``$NOTIFY_SOCKET``: a
path, or an abstract name written with a leading ``@``.  ``STATUS=...``
sets the line ``systemctl status`` shows, ``STOPPING=1`` says the service is
shutting down.  Without ``$NOTIFY_SOCKET`` (not started by systemd, or not
as ``Type=notify``) every call does nothing, as sd_notify() does.

The socket is made and connected when the :class:`Notifier` is made, so
make it *before* the daemon sandboxes itself; sending afterwards is one
``sendto`` on that socket, which the sandbox contract allows (README, "The
sandbox contract").  :class:`~dbus_vmstate2.backend.Backend` does all of
this when built with ``notify=True``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("dbus_vmstate2.backend")


class Notifier:
    """A connection to systemd's notification socket, or nothing.

    Args:
        address: the value of ``$NOTIFY_SOCKET``: an absolute path, or
            ``@name`` for an abstract socket; None or empty: do nothing.

    Raises:
        ValueError: ``address`` is not a form this module speaks (systemd
            also knows ``vsock:``, for virtual machines).
        OSError: the socket cannot be made or connected; a service that
            asked for notification would otherwise time out starting.
    """

    def __init__(self, address: str | None) -> None:
        self._socket: socket.socket | None = None
        if not address:
            return
        if address.startswith("@"):
            target = "\0" + address[1:]  # Linux's abstract namespace
        elif address.startswith("/"):
            target = address
        else:
            raise ValueError(f"NOTIFY_SOCKET={address!r}: only a path or an @abstract name is supported")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot connect to NOTIFY_SOCKET={address!r}: {exc.strerror}") from exc
        self._socket = sock

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` (of ``environ``, default ``os.environ``)."""
        return cls((os.environ if environ is None else environ).get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify."""
        return self._socket is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``VAR=value`` assignments in one datagram.

        Never blocks and never raises: a full or vanished receiver is logged
        and the daemon carries on, as it would without systemd.

        Returns:
            True if the datagram was sent (False without a socket too).
        """
        if self._socket is None:
            return False
        if any("\n" in a or "=" not in a for a in assignments):
            raise ValueError(f"not VAR=value lines: {assignments!r}")
        try:
            self._socket.send("\n".join(assignments).encode(), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError as exc:
            log.warning("could not notify systemd (%s): %s", ", ".join(a.split("=", 1)[0] for a in assignments), exc.strerror)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (and ``STATUS=``): the service is up."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=``: the line ``systemctl status`` shows."""
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        """``STOPPING=1``: the service is shutting down."""
        return self.notify("STOPPING=1")

    def close(self) -> None:
        """Close the socket; later calls do nothing."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
