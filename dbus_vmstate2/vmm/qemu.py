"""In step with QEMU's own migration, through its QMP socket (docs/migration.md §3).

Source (:class:`QemuSource`): enable ``pause-before-switchover``, start
QEMU's migration, and let the back-ends' pre-copy run while QEMU sends RAM.
When QEMU stops the VM and reports ``pre-switchover``, the back-ends switch
over (their stop-copy runs in QEMU's pause); once the destination has
acknowledged, ``migrate-continue`` lets QEMU finish.  On any failure before
that, ``migrate_cancel``: the source VM runs on, as do its back-ends.

Destination (:class:`QemuDestination`): QEMU runs with ``-S`` and an
``-incoming`` URI; once every back-end committed, wait until QEMU's incoming
migration completed, and only then ``cont``.

Every wait is bounded (``timeout``).  The QMP client is minimal: JSON lines
over a unix socket, replies matched by ``id``, events kept for the waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Callable
from typing import Any

from ..errors import VMStateError

QEMU_TIMEOUT = 300.0
"""Default seconds for QEMU's part: its migration to reach ``pre-switchover``
is bounded by the pre-copy's own timeout; this bounds the rest (its
completion after ``migrate-continue``, the incoming side's completion)."""

QMP_TIMEOUT = 30.0
"""Seconds for QEMU to answer one QMP command."""


class QemuFailed(VMStateError):
    """QEMU's side of the migration failed, or QMP could not be used (the message says which)."""


class QMP:
    """A QMP connection: commands and events."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._replies: dict[str, asyncio.Future[Any]] = {}
        self._watchers: list[Callable[[dict[str, Any]], None]] = []
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, path: str, timeout: float = QMP_TIMEOUT) -> QMP:
        """Connect and leave capabilities negotiation mode.

        Raises:
            QemuFailed: no QMP socket at ``path``, or no greeting in time.
        """
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
            async with asyncio.timeout(timeout):
                greeting = json.loads(await reader.readline() or b"{}")
        except (OSError, TimeoutError, ValueError) as exc:
            raise QemuFailed(f"cannot use QEMU's QMP socket {path}: {exc or type(exc).__name__}") from exc
        if "QMP" not in greeting:
            writer.close()
            raise QemuFailed(f"{path} is not a QMP socket (no greeting)")
        qmp = cls(path, reader, writer)
        await qmp.execute("qmp_capabilities")
        return qmp

    async def _read(self) -> None:
        error: BaseException = QemuFailed(f"QEMU closed its QMP socket {self.path}")
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "event" in message:
                    for watcher in list(self._watchers):
                        watcher(message)
                elif (future := self._replies.pop(str(message.get("id")), None)) is not None and not future.done():
                    future.set_result(message)
        except (OSError, ValueError) as exc:
            error = QemuFailed(f"QMP socket {self.path} failed: {exc}")
        for future in self._replies.values():
            if not future.done():
                future.set_exception(error)
        for watcher in list(self._watchers):
            watcher({"event": "QMP_CLOSED"})

    async def execute(self, command: str, timeout: float = QMP_TIMEOUT, **arguments: Any) -> Any:
        """Run a command; return its ``return``.

        Raises:
            QemuFailed: QEMU answered with an error, or not within ``timeout``.
        """
        key = str(next(self._ids))
        future = asyncio.get_running_loop().create_future()
        self._replies[key] = future
        request = {"execute": command, "id": key, **({"arguments": arguments} if arguments else {})}
        self._writer.write(json.dumps(request).encode() + b"\n")
        try:
            async with asyncio.timeout(timeout):
                reply = await future
        except TimeoutError:
            raise QemuFailed(f"QEMU did not answer {command} within {timeout:g} s") from None
        finally:
            self._replies.pop(key, None)
        if "error" in reply:
            raise QemuFailed(f"QEMU refused {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def watch(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``callback`` with every event (``QMP_CLOSED`` when the socket ends); returns the undo."""
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback) if callback in self._watchers else None

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


async def _migration_status(qmp: QMP) -> str:
    return (await qmp.execute("query-migrate") or {}).get("status", "none")


class QemuSource:
    """QEMU's migration on the source, paced with ours.

    Args:
        qmp_path: QEMU's QMP socket.
        uri: where QEMU sends its own migration (its ``migrate`` URI).
        timeout: seconds for QEMU's completion after ``migrate-continue``.
    """

    def __init__(self, qmp_path: str, uri: str, timeout: float = QEMU_TIMEOUT) -> None:
        self.qmp_path = qmp_path
        self.uri = uri
        self.timeout = timeout
        self.qmp: QMP | None = None
        self.pre_switchover = asyncio.Event()
        self._failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._status = asyncio.Event()
        self.status = "none"
        self._unwatch: Callable[[], None] | None = None
        self._poller: asyncio.Future[None] | None = None
        self.started = False

    async def start(self) -> None:
        """Enable pause-before-switchover and start QEMU's migration.

        Raises:
            QemuFailed: QMP cannot be used, or QEMU refuses (a migration
                already running, a bad URI).
        """
        self.qmp = await QMP.connect(self.qmp_path)
        self._unwatch = self.qmp.watch(self._on_event)
        status = await _migration_status(self.qmp)
        if status not in ("none", "completed", "failed", "cancelled"):
            raise QemuFailed(f"QEMU already runs a migration (status {status!r}): cancel it first")
        await self.qmp.execute("migrate-set-capabilities", capabilities=[
            {"capability": "pause-before-switchover", "state": True},
            {"capability": "events", "state": True},  # MIGRATION events, else none come
        ])  # fmt: skip
        await self.qmp.execute("migrate", uri=self.uri)
        self.started = True
        self._poller = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        """Ask for the status every half second too: an event lost costs that, not a hang."""
        assert self.qmp is not None
        while not self._failed.done():
            await asyncio.sleep(0.5)
            try:
                status = await _migration_status(self.qmp)
            except QemuFailed as exc:
                self._fail(str(exc))
                return
            if status != self.status:
                self._on_event({"event": "MIGRATION", "data": {"status": status}})

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "QMP_CLOSED":
            self._fail(f"QEMU closed its QMP socket {self.qmp_path} (did it exit?)")
            return
        if event.get("event") != "MIGRATION":
            return
        self.status = event.get("data", {}).get("status", "")
        self._status.set()
        if self.status == "pre-switchover":
            self.pre_switchover.set()
        elif self.status in ("failed", "cancelled"):
            self._fail(f"QEMU's own migration to {self.uri} {self.status}")

    def _fail(self, message: str) -> None:
        if not self._failed.done():
            self._failed.set_exception(QemuFailed(message))

    @property
    def failed(self) -> asyncio.Future[None]:
        """Fails when QEMU's migration fails (or QMP goes away); never succeeds."""
        return self._failed

    async def finish(self) -> None:
        """``migrate-continue`` and wait for QEMU's migration to complete.

        Raises:
            QemuFailed: QEMU's migration failed, or did not complete in time.
        """
        assert self.qmp is not None
        await self.qmp.execute("migrate-continue", state="pre-switchover")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while self.status != "completed":
            if self._failed.done():
                self._failed.result()
            left = deadline - loop.time()
            if left <= 0:
                raise QemuFailed(f"QEMU's migration did not complete within {self.timeout:g} s of migrate-continue")
            self._status.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await self._status.wait()
            if self.status != "completed":  # an event lost: ask
                self.status = await _migration_status(self.qmp)

    async def cancel(self) -> None:
        """``migrate_cancel``: the source VM runs on (never raises)."""
        if self.qmp is not None and self.started:
            with contextlib.suppress(Exception):
                await self.qmp.execute("migrate_cancel")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
        if self._unwatch is not None:
            self._unwatch()
        if not self._failed.done():
            self._failed.cancel()
        if self.qmp is not None:
            await self.qmp.close()


class QemuDestination:
    """QEMU's incoming side: resumed (``cont``) only once it completed and our back-ends committed."""

    def __init__(self, qmp_path: str, timeout: float = QEMU_TIMEOUT) -> None:
        self.qmp_path = qmp_path
        self.timeout = timeout
        self.qmp: QMP | None = None

    async def start(self) -> None:
        """Connect, and check QEMU waits for an incoming migration, stopped.

        Raises:
            QemuFailed: QMP cannot be used, or the VM is already running.
        """
        self.qmp = await QMP.connect(self.qmp_path)
        status = (await self.qmp.execute("query-status") or {}).get("status")
        if status == "running":
            raise QemuFailed("the destination VM is already running: start QEMU with -S and -incoming")

    async def resume_when_complete(self) -> None:
        """Wait for QEMU's incoming migration to complete, then ``cont``.

        Raises:
            QemuFailed: it failed, QEMU went away, or it did not complete in time
                (the VM is left stopped).
        """
        assert self.qmp is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            status = await _migration_status(self.qmp)
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise QemuFailed(f"QEMU's incoming migration {status}: the VM stays stopped")
            if loop.time() >= deadline:
                raise QemuFailed(f"QEMU's incoming migration did not complete within {self.timeout:g} s: the VM stays stopped")
            await asyncio.sleep(0.05)
        await self.qmp.execute("cont")

    async def close(self) -> None:
        if self.qmp is not None:
            await self.qmp.close()
