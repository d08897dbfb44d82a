"""A stand-in for ``dbus_vmstate2.vmm.loading.StagedLoads`` until that lands.

TEMPORARY: the two-phase load across back-ends is being written on main
(``vmm/loading.py``); :mod:`.incoming` imports it from there when it exists
and falls back to this minimal version of the same contract otherwise, so
that migrations can be tested end to end meanwhile.  Delete this module once
``vmm/loading.py`` is merged.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence

from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus

from ..errors import VMStateError
from ..fds import enlarge_pipe
from ..names import VMSTATE2
from .calls import SignalWatch, call
from .discovery import BackendInfo
from .transfers import STALL_TIMEOUT, Operation, Progress, labelled, wait_regardless

COMMIT_TIMEOUT = 60.0


class _Staged(SignalWatch):
    MEMBER = "LoadStaged"

    def __init__(self, bus: MessageBus) -> None:
        super().__init__(bus)
        self.seen: set[tuple[str, int]] = set()
        self.event = asyncio.Event()

    def on_signal(self, msg: Message) -> None:
        if msg.sender and msg.signature == "t":
            self.seen.add((msg.sender, msg.body[0]))
            self.event.set()


class StagedLoads:
    """Load several back-ends at once, all or nothing (two-phase)."""

    def __init__(
        self, bus: MessageBus, backends: Sequence[BackendInfo], progress: Progress | None = None, *,
        stall_timeout: float | None = STALL_TIMEOUT, commit_timeout: float = COMMIT_TIMEOUT,
    ) -> None:
        self._bus = bus
        self._backends = list(backends)
        self._stall = stall_timeout
        self._commit_timeout = commit_timeout
        self._operation = Operation(bus, backends)
        self._staged = _Staged(bus)
        self._numbers: dict[str, int] = {}
        self._committed = False
        self.fds: dict[str, int] = {}

    async def __aenter__(self) -> StagedLoads:
        await self._operation.signals.__aenter__()
        await self._staged.__aenter__()
        try:
            options = {"commit": Variant("s", "explicit"), "commit-timeout": Variant("u", max(1, int(self._commit_timeout)))}
            for backend in self._backends:
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                self.fds[backend.id] = write_end
                enlarge_pipe(write_end)
                try:
                    self._numbers[backend.id] = await self._operation.start(backend, "Load", read_end, options)
                except VMStateError as exc:
                    raise labelled(backend, exc) from exc
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    def end_input(self, backend_id: str) -> None:
        fd = self.fds.get(backend_id, -1)
        if fd >= 0:
            os.close(fd)
            self.fds[backend_id] = -1

    async def commit(self) -> list[float]:
        for backend in self._backends:
            self.end_input(backend.id)
        deadline = time.monotonic() + (self._stall or 30.0)
        for backend in self._backends:
            number = self._numbers[backend.id]
            while (backend.unique_name, number) not in self._staged.seen:
                self._staged.event.clear()
                try:
                    _, finished, *_ = await call(self._bus, backend.unique_name, VMSTATE2, "Check")
                    if finished:
                        await self._operation.signals.wait_finished(backend, number)
                        raise VMStateError("its load ended without being staged")
                    state = await call(self._bus, backend.unique_name, "org.freedesktop.DBus.Properties", "Get", "ss",
                                       [VMSTATE2, "State"])  # fmt: skip
                    if state[0].value == "staged":
                        break
                except VMStateError as exc:
                    raise labelled(backend, exc) from exc
                left = deadline - time.monotonic()
                if left <= 0:
                    raise labelled(backend, VMStateError("its load was not staged in time"))
                try:
                    await asyncio.wait_for(self._staged.event.wait(), min(left, 0.5))
                except TimeoutError:
                    pass
        started = time.monotonic()
        for backend in self._backends:
            await call(self._bus, backend.unique_name, VMSTATE2, "Commit", "t", [self._numbers[backend.id]])
        self._committed = True
        seconds = []
        for backend in self._backends:
            try:
                await self._operation.signals.wait_finished(backend, self._numbers[backend.id])
            except VMStateError as exc:
                raise labelled(backend, exc) from exc
            seconds.append(time.monotonic() - started)
        return seconds

    async def __aexit__(self, *exc_info: object) -> None:
        for backend_id in list(self.fds):
            self.end_input(backend_id)
        if not self._committed:
            await wait_regardless(asyncio.ensure_future(self._operation.stop()))
        await self._staged.__aexit__(None, None, None)
        await self._operation.signals.__aexit__(None, None, None)
