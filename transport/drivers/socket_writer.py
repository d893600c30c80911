"""Writing scatter-gather parts to a plain socket straight from their memory, whatever the loop.

CPython 3.11's selector transport copies whatever the kernel did not take at once into a
bytearray (most of each 8 MiB chunk on a busy machine) and its `writelines()` joins the parts into
one new bytes object; only uvloop and newer CPythons keep references instead. `SocketWriter`
writes with `sendmsg` on a duplicate of the connection's descriptor and waits for writability in
between, so `write()` returns once the kernel holds every byte and nothing is buffered (or copied)
in user space. The tcp and http drivers use it for their plain connections; TLS goes through the
transport (encryption makes new buffers anyway).

Ordering: the transport and the writer write to the same socket. Use the writer only while the
transport's own write buffer is empty (`plain_socket_writer` checks at creation, callers that
also write through the transport check `transport.get_write_buffer_size()`).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence

from transport.drivers.base import Buffer

__all__ = ["SocketWriter", "plain_socket_writer"]

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


class SocketWriter:
    """Writes scatter-gather parts from their own memory with sendmsg, never buffering them.

    It owns a duplicate of the connection's descriptor: the loop refuses add_writer() on a
    descriptor a transport owns, and the duplicate is a descriptor of its own for the same
    socket. Close it before (or as) the transport closes: the connection ends only once both
    descriptors are closed.
    """

    def __init__(self, fileno: int) -> None:
        self._socket = socket.socket(fileno=os.dup(fileno))
        self._socket.setblocking(False)
        self._waiter: asyncio.Future[None] | None = None

    async def write(self, parts: Sequence[Buffer]) -> None:
        """Hand every byte of `parts` to the kernel, in order; OSError when the socket fails."""
        views = [_flat(part) for part in parts if len(part)]
        while views:
            try:
                sent = self._socket.sendmsg(views[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            _advance(views, sent)
            if views:
                await self._writable()

    async def _writable(self) -> None:
        if self._socket.fileno() < 0:
            raise ConnectionResetError("the connection is closed")
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        fileno = self._socket.fileno()
        loop.add_writer(fileno, _resolve, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if self._socket.fileno() >= 0:
                loop.remove_writer(fileno)

    def close(self) -> None:
        """Release the descriptor; a write waiting for room fails with ConnectionResetError."""
        if self._socket.fileno() < 0:
            return
        waiter = self._waiter
        if waiter is not None:
            asyncio.get_running_loop().remove_writer(self._socket.fileno())
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the connection is closed"))
        self._socket.close()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _flat(part: Buffer) -> memoryview:
    view = part if isinstance(part, memoryview) else memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _advance(views: list[memoryview], sent: int) -> None:
    """Drop the first `sent` bytes from the front of `views`, in place."""
    while sent and views:
        head = views[0]
        if sent >= head.nbytes:
            sent -= head.nbytes
            views.pop(0)
        else:
            views[0] = head[sent:]
            sent = 0


def plain_socket_writer(transport: asyncio.BaseTransport) -> SocketWriter | None:
    """A SocketWriter for a plain tcp transport; None under TLS or without a socket."""
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return None
    return SocketWriter(sock.fileno())
