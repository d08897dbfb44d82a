"""Calls made as another Unix user, over a bus connection of that user's own.

busctl cannot pass an fd, and the test's interpreter may sit where another
user cannot reach it, so a forked child of the test, already holding every
module it needs, drops to the user and makes the call.
"""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from dbus_vmstate2.names import OBJECT_PATH

NOBODY = 65534


def call_as(user: int, address: str, destination: str, interface: str, member: str,
            signature: str = "", body: list[Any] | None = None, fds: Sequence[int] = ()) -> tuple[str, str]:  # fmt: skip
    """Call ``member`` as ``user``; return ``(error name, its message)``, both
    empty for a method return.  ``fds`` go with the call (an ``h`` argument
    names them by index)."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only calls and exits
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)

            async def call() -> tuple[str, str]:
                bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
                reply = await bus.call(Message(destination=destination, path=OBJECT_PATH, interface=interface,
                                               member=member, signature=signature, body=body or [],
                                               unix_fds=list(fds)))  # fmt: skip
                bus.disconnect()
                if reply.message_type is MessageType.ERROR:
                    return reply.error_name or "", str(reply.body[0]) if reply.body else ""
                return "", ""

            os.write(w, json.dumps(asyncio.run(call())).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as result:
        answer = result.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed to call"
    error_name, message = json.loads(answer)
    return error_name, message
