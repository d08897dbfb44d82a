"""What an operator does to back-ends besides moving their state: look at
their latest transfer, stop it, reset a back-end out of ``error``.

Each function handles one back-end and reports a refusal or a failure in its
result instead of raising, so that a command can act on every back-end and
show them all.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from dbus_fast.aio import MessageBus

from ..errors import ErrorName, InvalidState, VMStateError
from ..names import VMSTATE2
from .calls import call
from .discovery import NOT_VMSTATE2, BackendInfo, describe
from .transfers import FinishedSignals

VMSTATE1_ONLY = "vmstate1-only"


@dataclass(frozen=True, slots=True)
class TransferReport:
    """A back-end's latest transfer, as Check reports it."""

    number: int | None
    """Its number; None when it failed (Check then answers only with the error)."""
    finished: bool
    records: int | None = None
    raw_bytes: int | None = None
    stream_bytes: int | None = None
    error: VMStateError | None = None
    """Why it failed."""


@dataclass(frozen=True, slots=True)
class StatusReport:
    """One back-end's State and latest transfer."""

    id: str
    unique_name: str
    state: str = "unknown"
    """The VMState2 State, or ``vmstate1-only``."""
    transfer: TransferReport | None = None
    """None when it has had no transfer yet."""
    error: VMStateError | None = None
    """The back-end could not be asked (it left the bus, ...)."""


@dataclass(frozen=True, slots=True)
class CancelReport:
    """What ``cancel`` did to one back-end."""

    id: str
    unique_name: str
    transfer: int | None = None
    """The running transfer that was found, if any."""
    cancelled: bool = False
    """CancelTransfer stopped it."""
    outcome: VMStateError | None = None
    """How it ended (Cancelled, normally), if it ended within the wait."""
    note: str = ""
    """Why nothing was cancelled, for people."""
    error: VMStateError | None = None


@dataclass(frozen=True, slots=True)
class ResetReport:
    """What ``reset`` did to one back-end."""

    id: str
    unique_name: str
    before: str = "unknown"
    after: str = "unknown"
    error: VMStateError | None = None


async def _latest(bus: MessageBus, backend: BackendInfo) -> TransferReport | None:
    """The latest transfer from Check; None if it has had none.

    Raises:
        VMStateError: the back-end could not be asked.
    """
    try:
        number, finished, records, raw_bytes, stream_bytes = await call(bus, backend.unique_name, VMSTATE2, "Check")
    except InvalidState:
        return None  # Check's answer while there has been no transfer
    except VMStateError as exc:
        if exc.remote_name in set(ErrorName):
            return TransferReport(None, True, error=exc)  # the latest transfer failed with this
        raise
    return TransferReport(number, finished, records, raw_bytes, stream_bytes)


async def status(bus: MessageBus, backend: BackendInfo) -> StatusReport:
    """A back-end's State and its latest transfer."""
    try:
        described = await describe(bus, backend)
        if described.state == VMSTATE1_ONLY:
            return StatusReport(backend.id, backend.unique_name, described.state)
        latest = await _latest(bus, backend)
        return StatusReport(backend.id, backend.unique_name, described.state, latest)
    except VMStateError as exc:
        return StatusReport(backend.id, backend.unique_name, error=exc)


async def cancel_latest(bus: MessageBus, backend: BackendInfo, wait: float = 10.0) -> CancelReport:
    """Stop the back-end's running transfer, whoever started it (CancelTransfer).

    Args:
        wait: how long to wait for the transfer to end once cancelled.
    """
    report = CancelReport(backend.id, backend.unique_name)
    try:
        async with FinishedSignals(bus) as signals:
            try:
                latest = await _latest(bus, backend)
            except VMStateError as exc:
                if exc.remote_name in NOT_VMSTATE2:
                    return replace(report, note="VMState1 only: nothing to cancel")
                raise
            if latest is None:
                return replace(report, note="no transfer yet")
            if latest.error is not None:
                return replace(report, note=f"nothing running (the latest transfer failed: {type(latest.error).__name__})")
            if latest.finished or latest.number is None:
                return replace(report, note=f"nothing running (transfer #{latest.number} has ended)")
            [cancelled] = await call(bus, backend.unique_name, VMSTATE2, "CancelTransfer", "t", [latest.number])
            if not cancelled:
                return replace(report, transfer=latest.number, note=f"transfer #{latest.number} ended before it could be cancelled")
            outcome: VMStateError | None = None
            try:
                async with asyncio.timeout(wait):
                    await signals.wait_finished(backend, latest.number)
            except TimeoutError:
                return replace(report, transfer=latest.number, cancelled=True, note=f"still ending after {wait:g} s")
            except VMStateError as exc:
                outcome = exc
            return replace(report, transfer=latest.number, cancelled=True, outcome=outcome)
    except VMStateError as exc:
        return replace(report, error=exc)


async def reset(bus: MessageBus, backend: BackendInfo) -> ResetReport:
    """Reset a back-end: from ``error`` back to ``running`` (a no-op in ``running``)."""
    return await _change_state(bus, backend, "Reset")


async def resume(bus: MessageBus, backend: BackendInfo) -> ResetReport:
    """Resume a back-end: from ``stopped`` (after a live save's stop-copy) back
    to ``running`` (a no-op in ``running``)."""
    return await _change_state(bus, backend, "Resume")


async def _change_state(bus: MessageBus, backend: BackendInfo, member: str) -> ResetReport:
    report = ResetReport(backend.id, backend.unique_name)
    try:
        before = (await describe(bus, backend)).state
        report = replace(report, before=before, after=before)
        if before == VMSTATE1_ONLY:
            return report
        await call(bus, backend.unique_name, VMSTATE2, member)
        return replace(report, after=(await describe(bus, backend)).state)
    except VMStateError as exc:
        return replace(report, error=exc)
