"""Find the back-ends on a bus the way QEMU's dbus-vmstate does, and more.

A back-end queues on ``org.qemu.VMState1`` (QEMU's name), on
``org.qemu.VMState2``, or on both: a back-end may stay out of QEMU's own
dbus-vmstate, and a strict bus policy may refuse it one of the names.
``ListQueuedOwners`` of both names gives their unique names (VMState1's queue
first, in queue order, as QEMU sees it), and ``Properties.GetAll`` of the
interface each was found by gives its Id.  As in QEMU since 7.1, a peer that
does not answer GetAll is skipped with a warning (it is not one of ours), a
duplicate Id is an error, and with an Id list only those Ids are kept and each
must be present.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from dbus_fast import AuthError, InvalidAddressError, Variant
from dbus_fast.aio import MessageBus

from ..bus import open_bus
from ..errors import DiscoveryError, VMStateError
from ..names import OBJECT_PATH, VMSTATE1, VMSTATE2
from .calls import BUS_NAME, PROPERTIES, call

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """One back-end found on the bus."""

    id: str
    """Its Id, unique on the bus."""
    unique_name: str
    """The unique bus name (``:1.N``) that addresses it."""


async def connect(address: str | None) -> MessageBus:
    """Connect to ``address`` (the session bus when None), with fd passing.

    Raises:
        ConnectionError: the address is malformed, nothing listens there, or
            the bus refused us; the message names the address.
    """
    where = address or "the session bus"
    try:
        return await open_bus(address)
    except (OSError, EOFError, ValueError, InvalidAddressError, AuthError) as exc:
        raise ConnectionError(f"cannot use {where}: {exc or type(exc).__name__}") from exc


async def list_backends(bus: MessageBus, id_list: Sequence[str] | None = None) -> list[BackendInfo]:
    """Return the back-ends on ``bus``, in queue order.

    Args:
        id_list: keep only these Ids, and require each of them.

    Raises:
        DiscoveryError: two back-ends share an Id, or an Id of ``id_list``
            is not on the bus.
    """
    found: dict[str, BackendInfo] = {}
    for owner, interface in await _queued_owners(bus):
        try:
            [props] = await call(bus, owner, PROPERTIES, "GetAll", "s", [interface], path=OBJECT_PATH)
            backend_id = props["Id"].value
        except (VMStateError, KeyError) as exc:
            log.warning("%s queues on %s but has no readable Id, skipped: %s", owner, interface, exc)
            continue
        if id_list is not None and backend_id not in id_list:
            continue
        if backend_id in found:
            raise DiscoveryError(
                f"two back-ends have the Id {backend_id!r}: {found[backend_id].unique_name} and {owner}"
            )
        found[backend_id] = BackendInfo(backend_id, owner)
    if id_list is not None:
        missing = [i for i in id_list if i not in found]
        if missing:
            raise DiscoveryError(f"required back-ends are not on the bus: {', '.join(missing)}")
    return list(found.values())


async def _queued_owners(bus: MessageBus) -> list[tuple[str, str]]:
    """(unique name, interface) of every owner queued on either name, each once."""
    owners: dict[str, str] = {}
    for name in (VMSTATE1, VMSTATE2):
        try:
            [queued] = await call(bus, BUS_NAME, BUS_NAME, "ListQueuedOwners", "s", [name], path="/org/freedesktop/DBus")
        except VMStateError as exc:
            if exc.remote_name != "org.freedesktop.DBus.Error.NameHasNoOwner":
                raise
            queued = []
        for owner in queued:
            owners.setdefault(owner, name)
    return list(owners.items())


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """What ``list`` shows of one back-end."""

    id: str
    unique_name: str
    state: str
    """The VMState2 ``State``, or ``vmstate1-only`` for a back-end without VMState2."""
    capabilities: dict[str, object]


async def describe(bus: MessageBus, backend: BackendInfo) -> BackendStatus:
    """Read a back-end's VMState2 State and Capabilities."""
    try:
        [props] = await call(bus, backend.unique_name, PROPERTIES, "GetAll", "s", [VMSTATE2], path=OBJECT_PATH)
    except VMStateError as exc:
        if exc.remote_name not in NOT_VMSTATE2:
            raise
        return BackendStatus(backend.id, backend.unique_name, "vmstate1-only", {})
    caps = {name: variant.value for name, variant in props.get("Capabilities", Variant("a{sv}", {})).value.items()}
    state = props["State"].value if "State" in props else "unknown"
    return BackendStatus(backend.id, backend.unique_name, state, caps)


NOT_VMSTATE2 = (
    "org.freedesktop.DBus.Error.UnknownMethod",
    "org.freedesktop.DBus.Error.UnknownInterface",
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownProperty",
    "org.freedesktop.DBus.Error.InvalidArgs",  # dbus-fast's answer to GetAll of an interface it lacks
)
"""Replies that mean "this peer has no VMState2", as opposed to a failure."""
