"""One command's time on a bus: connect, find the back-ends, leave."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from dbus_fast.aio import MessageBus

from ..errors import NoBackends
from ..names import VMSTATE1
from .discovery import BackendInfo, connect, list_backends
from .transfers import wait_regardless


def bus_name(address: str | None) -> str:
    """How messages name the bus at ``address`` (None: the session bus)."""
    if address:
        return address
    session = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    return f"the session bus ({session})" if session else "the session bus"


@dataclass
class Session:
    """A connection to a VM's bus and the back-ends found on it."""

    bus: MessageBus
    backends: list[BackendInfo]
    where: str
    """The bus, as messages name it."""


@asynccontextmanager
async def open_session(
    address: str | None, id_list: Sequence[str] | None = None, *, require: bool = False
) -> AsyncIterator[Session]:
    """Connect to ``address``, find the back-ends, and disconnect at the end.

    Args:
        id_list: only these back-ends, each required.
        require: at least one back-end must be found (save and load).

    Raises:
        ConnectionError: the bus cannot be used.
        DiscoveryError: a back-end of ``id_list`` is missing, or an Id is
            on the bus twice.
        NoBackends: ``require`` and no back-end is on the bus.
    """
    where = bus_name(address)
    connecting = asyncio.ensure_future(connect(address))
    try:
        bus = await asyncio.shield(connecting)
    except asyncio.CancelledError:
        # Interrupted while connecting: finish, then leave, so that no
        # half-open socket is left to the garbage collector.
        await wait_regardless(connecting)
        if not connecting.cancelled() and connecting.exception() is None:
            await _leave(connecting.result())
        raise
    try:
        backends = await list_backends(bus, id_list)
        if require and not backends:
            raise NoBackends(f"no back-ends on {where}: nothing is queued on {VMSTATE1}")
        yield Session(bus, backends, where)
    finally:
        await _leave(bus)


async def _leave(bus: MessageBus) -> None:
    bus.disconnect()
    try:
        await bus.wait_for_disconnect()
    except (EOFError, OSError):  # the bus daemon went away first: the error that matters is already raised
        pass
