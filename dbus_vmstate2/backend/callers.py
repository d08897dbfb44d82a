"""Who may drive a back-end: the caller check, the library's own layer of
access control beside the bus policy (packaging/dbus/).

Every method call to org.qemu.VMState1 or org.qemu.VMState2 on our object
comes from a connection whose Unix user the bus driver knows
(``GetConnectionUnixUser``).  Only the users in the allow-list (by default
the back-end's own user and root) may call them; anyone else gets
``org.qemu.VMState2.Error.AccessDenied`` before anything moves, and the fds
the call carried are closed.  Reading properties and introspecting stay open
to every peer the bus admits: they change nothing.

The first call of a connection is held until the bus driver has answered
(the user is then cached for that unique name, which a bus never reuses, and
forgotten when the connection leaves); its later calls wait behind it, so
calls are always handled in the order they were sent.  A held call is then
handed back to dbus-fast's dispatch, as if it had just arrived.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection, Iterable

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from ..errors import ErrorName

log = logging.getLogger("dbus_vmstate2.backend")

BUS_DRIVER = "org.freedesktop.DBus"
OWNER_CHANGES = f"type='signal',sender='{BUS_DRIVER}',interface='{BUS_DRIVER}',member='NameOwnerChanged'"


def default_allowed_uids() -> frozenset[int]:
    """The back-end's own user, and root."""
    return frozenset({os.getuid(), 0})


class CallerGate:
    """A ``bus.add_message_handler`` callable that admits calls to
    ``interfaces`` on ``path`` only from the users in ``allowed``.

    Add it before every other handler: a call it holds must reach the others
    only once, when it is handed back.
    """

    def __init__(self, bus: MessageBus, path: str, interfaces: Collection[str], allowed: Iterable[int]) -> None:
        self._bus = bus
        self._path = path
        self._interfaces = frozenset(interfaces)
        self._members: frozenset[str] | None = None
        self.allowed = frozenset(allowed)
        self._uids: dict[str, int | None] = {}
        """Unique name -> its Unix user (None: unknown, refused)."""
        self._held: dict[str, list[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def watch_members(self, members: Iterable[str]) -> None:
        """Also guard calls that name no interface but one of ``members``."""
        self._members = frozenset(members)

    async def start(self) -> None:
        """Forget the users of connections that leave (they are never reused)."""
        self._bus.add_message_handler(self._on_owner_change)
        reply = await self._bus.call(Message(
            destination=BUS_DRIVER, path="/org/freedesktop/DBus", interface=BUS_DRIVER,
            member="AddMatch", signature="s", body=[OWNER_CHANGES],
        ))  # fmt: skip
        if reply.message_type is MessageType.ERROR:
            log.warning("cannot follow connections leaving the bus (%s): caller users stay cached", reply.error_name)

    def __call__(self, msg: Message) -> Message | bool | None:
        if not self._guards(msg):
            return None
        sender = msg.sender or ""
        if sender in self._held:  # behind a call still held: keep the order
            self._held[sender].append(msg)
            return True
        if sender not in self._uids:
            self._held[sender] = [msg]
            task = asyncio.get_running_loop().create_task(self._look_up(sender))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return True
        return None if self._uids[sender] in self.allowed else self._refuse(msg)

    def _guards(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.METHOD_CALL or msg.path != self._path:
            return False
        if msg.interface is None:
            return self._members is not None and msg.member in self._members
        return msg.interface in self._interfaces

    async def _look_up(self, sender: str) -> None:
        uid: int | None = None
        try:
            reply = await self._bus.call(Message(
                destination=BUS_DRIVER, path="/org/freedesktop/DBus", interface=BUS_DRIVER,
                member="GetConnectionUnixUser", signature="s", body=[sender],
            ))  # fmt: skip
            if reply.message_type is MessageType.METHOD_RETURN:
                uid = reply.body[0]
        except Exception as exc:  # the bus went away: refuse what was held
            log.warning("cannot learn the user of %s: %s", sender, exc)
        self._uids[sender] = uid
        for msg in self._held.pop(sender, []):
            if uid in self.allowed:
                self._bus._process_message(msg)  # dispatch it as if it had just arrived
            else:
                self._bus.send(self._refuse(msg))

    def _refuse(self, msg: Message) -> Message:
        uid = self._uids.get(msg.sender or "")
        who = "an unknown user" if uid is None else f"uid {uid}"
        log.warning("refused %s.%s from %s (%s): not an allowed caller", msg.interface, msg.member, msg.sender, who)
        for fd in msg.unix_fds:  # ours to close: the call never reaches a method
            try:
                os.close(fd)
            except OSError:
                pass
        return Message.new_error(
            msg, ErrorName.ACCESS_DENIED,
            f"{msg.member} refused: the caller ({who}) is not one of the users allowed to drive this back-end",
        )

    def _on_owner_change(self, msg: Message) -> None:
        if (msg.message_type is MessageType.SIGNAL and msg.sender == BUS_DRIVER and msg.member == "NameOwnerChanged"
                and msg.signature == "sss"):  # fmt: skip
            name, _, new_owner = msg.body
            if name.startswith(":") and not new_owner:
                self._uids.pop(name, None)
