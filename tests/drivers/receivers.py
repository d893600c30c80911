"""Receivers used by the driver tests: record what arrives, or echo it back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from transport.drivers.base import DriverConnection
from transport.exceptions import ConnectionClosedError, TransportError

KiB = 1024


class RecordingReceiver:
    """Copies everything received out of one small reused buffer into `data`; records events."""

    def __init__(self, buffer_size: int = 64 * KiB) -> None:
        self._buffer = memoryview(bytearray(buffer_size))
        self.data = bytearray()
        self.events: list[str] = []
        self.lost: asyncio.Future[TransportError | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], seconds: float = 10.0) -> None:
        """Wait until `predicate` holds after some callback; fail after `seconds`."""
        async with asyncio.timeout(seconds):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_for_bytes(self, count: int, seconds: float = 10.0) -> None:
        """Wait until at least `count` bytes arrived."""
        await self.wait_for(lambda: len(self.data) >= count, seconds)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        self.data += self._buffer[:nbytes]
        self._changed.set()

    def eof_received(self) -> None:
        self.events.append("eof")
        self._changed.set()

    def connection_lost(self, exc: TransportError | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)
        self._changed.set()


class EchoReceiver(RecordingReceiver):
    """Sends back every received byte, in order, from one task per connection."""

    def __init__(self, conn: DriverConnection) -> None:
        super().__init__()
        self._conn = conn
        self._outgoing: asyncio.Queue[bytes] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        self._outgoing.put_nowait(bytes(self._buffer[:nbytes]))

    async def _pump(self) -> None:
        try:
            while True:
                await self._conn.send([await self._outgoing.get()])
        except ConnectionClosedError:
            pass
