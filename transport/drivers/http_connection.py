"""One `http://` or `https://` connection: a full-duplex byte pipe made of one HTTP/1.1 exchange.

The client's POST request body carries client->server bytes and the server's response body carries
server->client bytes; both are chunked and stream at the same time (aiohttp does full duplex on
one HTTP/1.1 connection: the server prepares its response before reading the request body, the
client reads the response while its request body is still being written). `HttpConnection` is the
same on both sides; `transport.drivers.http` builds it from a client request or a server handler.

Sending: each `send(parts)` becomes one HTTP chunk whose framing we write ourselves, straight to
the asyncio transport: `size\\r\\n`, every part by reference, `\\r\\n`. aiohttp's own chunked
writer would join size line, part and CRLF into one new bytes object for every write on Python
< 3.12.9 (and asyncio's writelines() joins too), a full copy of each 8 MiB part. The writer's
`chunked` flag is turned off once its headers are out so aiohttp adds no framing of its own.
On plain http the chunk goes out through a `SocketWriter` (transport/drivers/socket_writer.py:
`sendmsg` from the parts' memory on a duplicate of the socket's descriptor, returning once the
kernel holds every byte), because CPython 3.11's transport copies what the kernel did not take at
once. It is used only while the transport's own buffer is empty (the headers, our last chunk and
anything aiohttp writes go through the transport), so the byte order on the socket holds. Under
TLS the parts go to the transport and `send()` awaits the writer's `drain()`, which waits while
the transport's write buffer is above its high-water mark.

Receiving: one reader task per connection takes what aiohttp's parser decoded (`readany()`, no
joining) and copies it into the receiver's `get_buffer()` memory. While reading is paused the
task stops calling `readany()`; aiohttp's StreamReader then fills up to its limit, pauses the
socket, and TCP's window throttles the peer.

Closing: `close()` ends our body (the zero-size last chunk), then waits until the peer ends its
body, which a tensorwire peer does as soon as it sees ours end; bytes that arrive meanwhile are
dropped, as a closed tcp transport drops them. The peer's receiver sees `eof_received()` then
`connection_lost(None)`. Reading on until the peer's end (instead of closing the socket at once)
matters: closing a socket with unread received bytes sends a reset that can destroy our own last
bytes in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aiohttp
from aiohttp.http import StreamWriter

from transport.drivers.base import (
    Buffer,
    ByteReceiver,
    DriverConnection,
    PeerInfo,
    byte_view,
    describe_error,
    map_exceptions,
)
from transport.drivers.socket_writer import plain_socket_writer
from transport.exceptions import ConnectionClosedError, TransportError

__all__ = ["LAST_CHUNK", "HttpConnection", "plain_body_writer"]

logger = logging.getLogger(__name__)

LAST_CHUNK = b"0\r\n\r\n"
_CHUNK_END = b"\r\n"
# Errors of a write or a drain on an established connection.
_SEND_ERRORS: dict[type[BaseException], type[TransportError]] = {
    aiohttp.ClientError: ConnectionClosedError,
    OSError: ConnectionClosedError,
    RuntimeError: ConnectionClosedError,  # uvloop, on a write to a closed handle
}


def plain_body_writer(writer: object) -> StreamWriter:
    """aiohttp's body writer with its headers sent and its own chunk framing switched off.

    The message headers still announce `Transfer-Encoding: chunked`: HttpConnection writes that
    framing itself (see the module docstring) and aiohttp's write_eof() then adds nothing.
    """
    if not isinstance(writer, StreamWriter):
        raise TypeError(f"expected aiohttp's StreamWriter, got {type(writer).__name__}")
    writer.send_headers()
    writer.chunked = False
    return writer


class HttpConnection(DriverConnection):
    """An http(s) connection over one streaming HTTP exchange; see DriverConnection.

    `writer`/`transport`: where our body goes; `content`: the peer's decoded body. `on_body_end`
    runs once our last chunk is written (the client lets aiohttp finish the request there);
    `release` runs once the connection is over (close the client session, let the server
    handler return).
    """

    def __init__(
        self,
        peer: PeerInfo,
        writer: StreamWriter,
        transport: asyncio.Transport,
        content: aiohttp.StreamReader,
        *,
        linger: float,
        on_body_end: Callable[[], None],
        release: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self.peer = peer
        self._writer = writer
        self._transport = transport
        low_water, high_water = transport.get_write_buffer_limits()  # the driver's options
        self._socket_writer = plain_socket_writer(transport, high_water, low_water)
        self._content = content
        self._linger = linger
        self._on_body_end = on_body_end
        self._release = release
        self._receiver: ByteReceiver | None = None
        self._closing = False  # close() or abort() called, or the peer ended its body
        self._body_ended = False
        self._paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._undelivered: memoryview | None = None  # read, then reading was paused mid-way
        self._reader: asyncio.Task[None] | None = None
        self._releasing: asyncio.Task[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"<HttpConnection {self._describe_peer()} closed={self.closed}>"

    def start(self, receiver: ByteReceiver) -> None:
        """Begin delivering the peer's bytes to `receiver`."""
        self._receiver = receiver
        self._reader = asyncio.get_running_loop().create_task(self._read_until_end())
        self._reader.add_done_callback(self._reader_done)

    # --- sending --------------------------------------------------------------------------------

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Write the parts as one HTTP chunk; wait while the write buffer is above high water."""
        self._raise_if_closed()
        views = [byte_view(part) for part in parts]
        size = sum(view.nbytes for view in views)
        if not size:  # a zero-size chunk would end the body
            return
        chunk: list[Buffer] = [b"%x\r\n" % size, *views, _CHUNK_END]
        writer = self._socket_writer
        if writer is not None and not self._transport.get_write_buffer_size():
            with map_exceptions(_SEND_ERRORS, f"cannot send to {self._describe_peer()}"):
                await writer.write(chunk)
            self._raise_if_closed()
            return
        with map_exceptions(_SEND_ERRORS, f"cannot send to {self._describe_peer()}"):
            write = self._transport.write
            for part in chunk:
                if len(part):
                    write(part)
        with map_exceptions(_SEND_ERRORS, f"cannot send to {self._describe_peer()}"):
            await self._writer.drain()
        self._raise_if_closed()

    def _end_body(self) -> None:
        """Write our last chunk once (best effort: the transport may already be gone)."""
        if self._body_ended:
            return
        self._body_ended = True
        if not self._transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                if self._socket_writer is not None and self._socket_writer.queued_bytes:
                    self._socket_writer.write_nowait([LAST_CHUNK])  # after what it holds
                else:
                    self._transport.write(LAST_CHUNK)
        self._on_body_end()

    # --- receiving ------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop delivering; aiohttp's buffer fills, pauses the socket, TCP throttles the peer."""
        self._paused = True
        self._resumed.clear()

    def resume_reading(self) -> None:
        """Deliver again (from the reader task, soon)."""
        self._paused = False
        self._resumed.set()

    async def _read_until_end(self) -> None:
        try:
            while True:
                await self._deliver_undelivered()
                data = await self._content.readany()
                if not data:
                    break
                if not self._closing:
                    self._deliver(memoryview(data))
        except asyncio.CancelledError:
            raise
        except _ReceiverFailed as failure:
            logger.error("receiver of %r failed; aborting the connection", self, exc_info=failure)
            self._close_socket_writer()
            self._transport.abort()
            self._finish(ConnectionClosedError(f"receiver of {self!r} failed: {failure}"))
        except Exception as exc:  # whatever aiohttp raises for a lost or garbled body
            self._on_read_error(exc)
        else:
            self._on_peer_body_end()

    async def _deliver_undelivered(self) -> None:
        """Wait while paused, then deliver what a pause left over; return once that is done."""
        while not self._closing and (self._paused or self._undelivered is not None):
            if self._paused:
                await self._resumed.wait()
            else:
                pending, self._undelivered = self._undelivered, None
                assert pending is not None
                self._deliver(pending)

    def _deliver(self, view: memoryview) -> None:
        """Copy `view` into the receiver's buffers until done or paused; keep any rest."""
        receiver = self._receiver
        assert receiver is not None
        try:
            while view.nbytes and not self._paused and not self._closing:
                buffer = receiver.get_buffer(view.nbytes)
                count = min(len(buffer), view.nbytes)
                if count == 0:
                    raise ValueError("get_buffer() returned an empty buffer")
                buffer[:count] = view[:count]
                view = view[count:]
                receiver.buffer_updated(count)
        except Exception as exc:
            raise _ReceiverFailed(describe_error(exc)) from exc
        self._undelivered = view if view.nbytes and not self._closing else None

    def _on_peer_body_end(self) -> None:
        """The peer ended its body: eof to the receiver (unless we are closing), then finish."""
        if not self._closing:
            self._closing = True
            if self._receiver is not None:
                self._receiver.eof_received()
        self._end_body()
        self._finish(None)

    def _on_read_error(self, exc: Exception) -> None:
        if self._closing:  # we are leaving anyway; how the peer left does not matter
            self._finish(None)
            return
        self._closing = True
        self._close_socket_writer()
        self._transport.abort()
        error = ConnectionClosedError(
            f"{self.peer.scheme} connection to {self.peer.address} lost: {describe_error(exc)}"
        )
        # Its traceback holds the reader's frame, and so this connection, and the link keeps
        # the error: a cycle holding the TLS session until the cyclic collector runs.
        error.__cause__ = exc.with_traceback(None)
        self._finish(error)

    # --- closing --------------------------------------------------------------------------------

    async def close(self) -> None:
        """End our body, wait (up to `linger` s) for the peer to end its own, then release."""
        if not self.lost.done() and not self._closing:
            self._closing = True
            self._resumed.set()  # a paused reader must run to see the peer's end
            self._end_body()
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), self._linger)
        except TimeoutError:
            logger.warning("%r: the peer did not end its body within %g s", self, self._linger)
            self.abort()
        except asyncio.CancelledError:
            self.abort()
            raise
        if self._releasing is not None:
            await asyncio.shield(self._releasing)

    def abort(self) -> None:
        """Drop the connection now; unsent bytes are lost."""
        self._closing = True
        self._close_socket_writer()
        self._transport.abort()
        if self._reader is not None and not self.lost.done():
            self._reader.cancel()
        self._finish(None)

    def _finish(self, error: TransportError | None) -> None:
        """Once: mark the connection lost, tell the receiver, release the HTTP exchange."""
        if self.lost.done():
            return
        self._closing = True
        self._undelivered = None
        self._close_socket_writer()
        self.lost.set_result(None)
        self._releasing = asyncio.get_running_loop().create_task(self._release())
        if self._receiver is not None:
            asyncio.get_running_loop().call_soon(self._receiver.connection_lost, error)

    def _reader_done(self, task: asyncio.Task[None]) -> None:
        # A finished task keeps its exception, whose traceback holds the reader's frame, which
        # holds this connection: let go of it, so the connection goes by reference counting.
        if self._reader is task:
            self._reader = None

    def _close_socket_writer(self) -> None:
        """Release the writer's descriptor: the socket closes only once both descriptors are."""
        if self._socket_writer is not None:
            self._socket_writer.close()

    @property
    def closed(self) -> bool:
        """True once closing, closed or lost."""
        return self._closing or self.lost.done() or self._transport.is_closing()

    def _describe_peer(self) -> str:
        return f"{self.peer.scheme}://{self.peer.address}"

    def _raise_if_closed(self) -> None:
        if self.closed:
            raise ConnectionClosedError(
                f"cannot send to {self._describe_peer()}: the connection is closed"
            )


class _ReceiverFailed(Exception):
    """The receiver's get_buffer()/buffer_updated() raised (not the network's fault)."""
