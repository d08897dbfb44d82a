"""Two-phase loads: a verified stream held staged until the VMM says Commit.

A load with ``commit`` ``explicit`` (interfaces/org.qemu.VMState2.xml, Load)
lets a VMM apply several back-ends' loads all or nothing.  The daemon's own
contract does not change: it takes the records as it always does and applies
them when its loop ends.  The loop simply does not end yet: once the whole
stream verified, the record iterator the daemon holds waits in
:meth:`StagedGate.wait` (in the transfer's worker thread) until the loop
thread says :meth:`~StagedGate.commit` (the iterator ends, the daemon
applies) or discards the load (the iterator raises Cancelled, as for any
failed stream, and the daemon drops what it staged).

Nothing waits for ever: a staged load is discarded after its commit timeout,
or at once when the connection that asked for it leaves the bus
(:class:`OwnerWatch`): a VMM that died can never commit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from ..errors import Cancelled, Unsupported, quote
from .boundary import option_values

COMMIT_TIMEOUT = 60
"""Default seconds a staged load waits for Commit."""

MAX_COMMIT_TIMEOUT = 3600


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """The options of a VMState2 Load (see interfaces/org.qemu.VMState2.xml)."""

    explicit_commit: bool = False
    commit_timeout: int = COMMIT_TIMEOUT

    TYPES: ClassVar[dict[str, str]] = {"commit": "s", "commit-timeout": "u"}
    MODES: ClassVar[dict[str, bool]] = {"auto": False, "explicit": True}

    @classmethod
    def from_dbus(cls, options: dict[str, Any]) -> LoadOptions:
        """Build from Load's ``a{sv}``.

        Raises:
            Unsupported: an unknown option, one of another type than the XML
                gives, or a value out of range.
        """
        values = option_values("Load", options, cls.TYPES)
        mode = values.get("commit", "auto")
        if mode not in cls.MODES:
            raise Unsupported(f"unknown Load commit mode {quote(str(mode))} (known: auto, explicit)")
        timeout = values.get("commit-timeout", COMMIT_TIMEOUT)
        if not 1 <= timeout <= MAX_COMMIT_TIMEOUT:
            raise Unsupported(f"the Load option commit-timeout must be 1..{MAX_COMMIT_TIMEOUT} seconds, got {timeout}")
        return cls(cls.MODES[mode], timeout)


class StagedGate:
    """Where a two-phase load's worker thread waits for the VMM's word.

    Args:
        timeout: seconds to wait for :meth:`commit`.
        on_staged: called in the worker thread once the stream verified,
            before it waits (it schedules the announcement on the loop).
    """

    def __init__(self, timeout: float, on_staged: Callable[[], None]) -> None:
        self._timeout = timeout
        self._on_staged = on_staged
        self._decided = threading.Event()
        self._committed = False
        self._discarded = False
        self._reason = ""

    # -- from the loop's thread ------------------------------------------------

    def commit(self) -> None:
        """Let the daemon apply the staged load, unless it was discarded
        first (a Commit right behind a Cancel: the outcome is Cancelled)."""
        if not self._discarded:
            self._committed = True
        self._decided.set()

    def discard(self, reason: str = "") -> None:
        """Make :meth:`wait` raise Cancelled (with ``reason``, if given),
        unless the load is already committed."""
        if not self._committed:
            self._discarded = True
            self._reason = self._reason or reason
        self._decided.set()

    # -- in the worker thread --------------------------------------------------

    def wait(self) -> None:
        """Announce the staged load and wait until it is committed.

        Once committed, the load is the daemon's: a Cancel that comes later
        changes nothing (interfaces/org.qemu.VMState2.xml, Cancel).

        Raises:
            Cancelled: discarded (Cancel, the VMM gone) or no Commit in time.
        """
        self._on_staged()
        if not self._decided.wait(self._timeout):
            raise Cancelled(
                f"no Commit came within the commit timeout of {self._timeout:g} s: the staged load was "
                "discarded; the back-end keeps its state"
            )
        if not self._committed:
            reason = self._reason or "it was cancelled"
            raise Cancelled(f"{reason}: the staged load was discarded; the back-end keeps its state")


class OwnerWatch:
    """Calls ``gone()`` once the connection ``owner`` leaves the bus.

    The bus driver announces it (NameOwnerChanged with an empty new owner);
    a match rule for just that name keeps other peers' comings and goings
    away, and a NameHasOwner after it covers an owner that left before.
    """

    DRIVER = "org.freedesktop.DBus"

    def __init__(self, bus: MessageBus, owner: str, gone: Callable[[], None]) -> None:
        self._bus = bus
        self._owner = owner
        self._gone = gone
        self._rule = f"type='signal',sender='{self.DRIVER}',member='NameOwnerChanged',arg0='{owner}'"
        self._active = False
        self._fired = False

    async def start(self) -> None:
        self._bus.add_message_handler(self._on_message)
        self._active = True
        await self._driver("AddMatch", self._rule)
        reply = await self._driver("NameHasOwner", self._owner)
        if reply is not None and reply.message_type is MessageType.METHOD_RETURN and not reply.body[0]:
            self._fire()

    async def stop(self) -> None:
        if not self._active:
            return
        self._active = False
        self._bus.remove_message_handler(self._on_message)
        if self._bus.connected:
            await self._driver("RemoveMatch", self._rule)

    async def _driver(self, member: str, arg: str) -> Message | None:
        try:
            return await self._bus.call(Message(
                destination=self.DRIVER, path="/org/freedesktop/DBus", interface=self.DRIVER, member=member,
                signature="s", body=[arg],
            ))  # fmt: skip
        except Exception:  # a bus that is gone: the transfer ends by its own timeout
            return None

    def _on_message(self, msg: Message) -> None:
        if (msg.message_type is MessageType.SIGNAL and msg.member == "NameOwnerChanged" and msg.sender == self.DRIVER
                and msg.signature == "sss" and msg.body[0] == self._owner and not msg.body[2]):  # fmt: skip
            self._fire()

    def _fire(self) -> None:
        if self._active and not self._fired:
            self._fired = True
            self._gone()
