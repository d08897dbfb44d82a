"""A minimal QMP client for the interop tests: JSON lines over a unix socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any


class QMPError(Exception):
    pass


class QMP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, path: str, timeout: float = 30.0) -> QMP:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        qmp = cls(reader, writer)
        await qmp._receive()  # the greeting
        await qmp.execute("qmp_capabilities")
        return qmp

    async def _receive(self) -> dict[str, Any]:
        while True:
            line = await asyncio.wait_for(self._reader.readline(), 60)
            if not line:
                raise ConnectionError("QEMU closed its QMP socket")
            message = json.loads(line)
            if "event" not in message:
                return message

    async def execute(self, command: str, **arguments: Any) -> Any:
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        reply = await self._receive()
        if "error" in reply:
            raise QMPError(f"{command}: {reply['error'].get('desc')}")
        return reply["return"]

    async def wait_migration(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll query-migrate until it completes or fails; return its last answer."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            status = await self.execute("query-migrate")
            if status.get("status") in ("completed", "failed", "cancelled"):
                return status
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"migration still {status.get('status')} after {timeout} s")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except ConnectionError:
            pass
