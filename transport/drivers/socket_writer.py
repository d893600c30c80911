"""Writing scatter-gather parts to a plain socket straight from their memory, whatever the loop.

CPython 3.11's selector transport copies whatever the kernel did not take at once into a
bytearray (most of each 8 MiB chunk on a busy machine) and its `writelines()` joins the parts into
one new bytes object; only uvloop and newer CPythons keep references instead. `SocketWriter`
writes with `sendmsg` on a duplicate of the connection's descriptor from the loop's writability
callback, keeping references to what waits (never copies); `write()` returns once at most a
high-water mark of bytes wait, as with a transport's buffer. The tcp and http drivers use it for
their plain connections; TLS goes through the transport (encryption makes new buffers anyway).

Ordering: the transport and the writer write to the same socket. Write through the transport
only while neither holds queued bytes (callers check `transport.get_write_buffer_size()` and
`queued_bytes`, or flush() first).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections import deque
from collections.abc import Sequence

from transport.drivers.base import Buffer, byte_view

__all__ = ["SocketWriter", "plain_socket_writer"]

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


class SocketWriter:
    """Writes scatter-gather parts from their own memory with sendmsg, keeping references to what
    the kernel has not taken yet (never copies).

    `write()` queues the parts, sends what the kernel takes at once, and returns while at most
    `high_water` bytes wait (else once they drained below `low_water`), so the caller prepares
    its next frame while the kernel drains these, as with a transport's buffer, but by
    reference. The loop's writability callback sends the rest. `flush()` waits until nothing
    waits. Owns a duplicate of the connection's descriptor: the loop refuses add_writer() on a
    descriptor a transport owns, and the duplicate is one of its own for the same socket. Close
    it before (or as) the transport closes: the connection ends once both descriptors are.
    """

    def __init__(self, fileno: int, high_water: int, low_water: int) -> None:
        self._socket = socket.socket(fileno=os.dup(fileno))
        self._socket.setblocking(False)
        self._high_water = high_water
        self._low_water = low_water
        self._queued: deque[memoryview] = deque()
        self._queued_bytes = 0
        self._watching = False  # add_writer() is in place
        self._error: OSError | None = None
        self._drained: asyncio.Future[None] | None = None  # resolves at or below _wanted
        self._wanted = 0

    @property
    def queued_bytes(self) -> int:
        """Bytes handed to write() that the kernel has not taken yet."""
        return self._queued_bytes

    async def write(self, parts: Sequence[Buffer]) -> None:
        """Queue `parts` (in order after what is queued), send what the kernel takes, and wait
        while more than high_water bytes are queued; OSError when the socket failed."""
        self.write_nowait(parts)
        if self._queued_bytes > self._high_water:
            await self._until_queued_at_most(self._low_water)
        self._raise_if_failed()

    def write_nowait(self, parts: Sequence[Buffer]) -> None:
        """Queue `parts` and send what the kernel takes, without waiting for room."""
        self._raise_if_failed()
        for part in parts:
            if len(part):
                view = byte_view(part)
                self._queued.append(view)
                self._queued_bytes += view.nbytes
        self._send_queued()

    async def flush(self) -> None:
        """Wait until the kernel took every queued byte (OSError if the socket failed)."""
        await self._until_queued_at_most(0)
        self._raise_if_failed()

    def _send_queued(self) -> None:
        """Send until the kernel's buffer is full; watch for room while bytes remain."""
        queued = self._queued
        try:
            while queued:
                sent = self._socket.sendmsg(list(itertools.islice(queued, _IOV_MAX)))
                self._queued_bytes -= sent
                _advance(queued, sent)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._fail(exc)
            return
        self._watch(bool(queued))
        self._wake_waiter()

    def _watch(self, wanted: bool) -> None:
        if wanted == self._watching or self._socket.fileno() < 0:
            return
        loop = asyncio.get_running_loop()
        if wanted:
            loop.add_writer(self._socket.fileno(), self._send_queued)
        else:
            loop.remove_writer(self._socket.fileno())
        self._watching = wanted

    async def _until_queued_at_most(self, count: int) -> None:
        while self._queued_bytes > count and self._error is None:
            self._wanted = count
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    def _wake_waiter(self) -> None:
        waiter = self._drained
        if waiter is None or waiter.done():
            return
        if self._queued_bytes <= self._wanted or self._error is not None:
            waiter.set_result(None)

    def _fail(self, error: OSError) -> None:
        if self._error is None:
            self._error = error
        self._watch(False)
        self._queued.clear()
        self._queued_bytes = 0
        self._wake_waiter()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Release the descriptor now; queued bytes are dropped, waiting writes fail with
        ConnectionResetError (call flush() first to close in order)."""
        if self._socket.fileno() < 0:
            return
        self._fail(ConnectionResetError("the connection is closed"))
        self._socket.close()


def _advance(views: deque[memoryview], sent: int) -> None:
    """Drop the first `sent` bytes from the front of `views`, in place."""
    while sent and views:
        head = views[0]
        if sent >= head.nbytes:
            sent -= head.nbytes
            views.popleft()
        else:
            views[0] = head[sent:]
            sent = 0


def plain_socket_writer(
    transport: asyncio.BaseTransport, high_water: int, low_water: int
) -> SocketWriter | None:
    """A SocketWriter for a plain tcp transport; None under TLS or without a socket."""
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return None
    return SocketWriter(sock.fileno(), high_water, low_water)
