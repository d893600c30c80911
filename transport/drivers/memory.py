"""`memory://name`: connections inside one process, for tests and embedding.

Listeners live in a registry per event loop. `connect()` builds a connected pair of
`MemoryConnection`s. Sent parts are queued by reference on the peer's side and copied once into
the peer receiver's `get_buffer()` memory, like a socket would. Delivery always happens in a later
loop callback, never inside `send()`, so a receiver that answers from `buffer_updated()` does not
recurse into its peer.

Back-pressure mirrors tcp: while a side's queue of undelivered bytes is above the high-water mark
(because its reader paused, or has not run yet) the peer's `send()` waits until the queue drains
below the low-water mark. Closing one side delivers the bytes already queued, then `eof_received()`
and `connection_lost(None)` to the other; aborting it delivers `connection_lost(error)` at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import weakref
from collections import deque
from collections.abc import Sequence
from typing import ClassVar
from urllib.parse import urlsplit

from transport.drivers.base import (
    AcceptCallback,
    Buffer,
    ByteReceiver,
    Driver,
    DriverConnection,
    HandshakeGate,
    Listener,
    PeerInfo,
    TLSConfig,
    describe_error,
)
from transport.exceptions import (
    ConfigError,
    ConnectError,
    ConnectionClosedError,
    TransportError,
)

__all__ = ["MemoryConnection", "MemoryDriver", "MemoryListener"]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_HIGH_WATER = 4 * MiB
# Bytes handed to one receiver per loop callback, so one busy pair cannot starve the loop.
_DELIVERY_BUDGET = 4 * MiB
_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,200}")

_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, MemoryListener]] = (
    weakref.WeakKeyDictionary()
)
_anonymous_names = itertools.count(1)
_connection_numbers = itertools.count(1)


def _listeners_of_running_loop() -> dict[str, MemoryListener]:
    return _listeners.setdefault(asyncio.get_running_loop(), {})


def _parse_memory_url(url: str, *, allow_empty: bool) -> str:
    """The name in `memory://name`; ConfigError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "memory":
        raise ConfigError(f"bad URL {url!r}: scheme must be memory")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"bad URL {url!r}: only memory://name is allowed")
    name = parts.netloc
    if not name and allow_empty:
        return ""
    if not _NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"bad URL {url!r}: the name must be 1-200 characters of A-Z a-z 0-9 . _ -"
        )
    return name


class MemoryConnection(DriverConnection):
    """One side of an in-process connection; see DriverConnection."""

    def __init__(self, peer: PeerInfo, high_water: int) -> None:
        self.peer = peer
        self._high_water = high_water
        self._low_water = high_water // 4
        self._other: MemoryConnection | None = None
        self._receiver: ByteReceiver | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()
        # Bytes sent by the other side, not yet copied into our receiver.
        self._inbox: deque[memoryview] = deque()
        self._inbox_bytes = 0
        self._eof_pending = False
        self._reading_paused = False
        self._delivery_scheduled = False
        self.inbox_drained = asyncio.Event()
        self.inbox_drained.set()

    def __repr__(self) -> str:
        return f"<MemoryConnection memory://{self.peer.address} closed={self._closed}>"

    def attach(self, other: MemoryConnection, receiver: ByteReceiver) -> None:
        """Wire this side to its peer and to the receiver of its incoming bytes."""
        self._other = other
        self._receiver = receiver

    # --- sending --------------------------------------------------------------------------------

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Queue the parts on the peer's side, then wait while its queue is above high water."""
        other = self._checked_other()
        for part in parts:
            view = memoryview(part).cast("B")
            if view.nbytes:
                other.enqueue(view)
        while not other.inbox_drained.is_set():
            await other.inbox_drained.wait()
            other = self._checked_other()

    def _checked_other(self) -> MemoryConnection:
        other = self._other
        if self._closed or other is None or other._closed:
            raise ConnectionClosedError(
                f"cannot send to memory://{self.peer.address}: the connection is closed"
            )
        return other

    def enqueue(self, view: memoryview) -> None:
        """Called by the peer: queue bytes for our receiver (no copy yet)."""
        self._inbox.append(view)
        self._inbox_bytes += view.nbytes
        if self._inbox_bytes > self._high_water:
            self.inbox_drained.clear()
        self._schedule_delivery()

    def enqueue_eof(self) -> None:
        """Called by the peer when it closes: eof follows the bytes already queued."""
        self._eof_pending = True
        self._schedule_delivery()

    # --- receiving ------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop delivering to the receiver; the peer's send() blocks once our queue is full."""
        self._reading_paused = True

    def resume_reading(self) -> None:
        """Deliver again (in a later loop callback, as a socket would)."""
        self._reading_paused = False
        self._schedule_delivery()

    def _schedule_delivery(self) -> None:
        if not self._delivery_scheduled and not self._closed:
            self._delivery_scheduled = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._delivery_scheduled = False
        try:
            budget_left = self._deliver_inbox()
        except Exception as exc:
            logger.exception("memory receiver failed on %r; aborting the connection", self)
            self._lose(ConnectionClosedError(f"receiver of {self!r} failed: {describe_error(exc)}"))
            self._abort_other()
            return
        if self._closed or self._reading_paused:
            return
        if self._inbox and budget_left <= 0:
            self._schedule_delivery()
        elif not self._inbox and self._eof_pending:
            self._finish_with_eof()

    def _deliver_inbox(self) -> int:
        """Copy queued bytes into the receiver until paused, empty or out of budget."""
        budget = _DELIVERY_BUDGET
        receiver = self._receiver
        assert receiver is not None
        while self._inbox and budget > 0 and not self._reading_paused and not self._closed:
            head = self._inbox[0]
            buffer = receiver.get_buffer(head.nbytes)
            count = min(len(buffer), head.nbytes)
            if count == 0:
                raise ValueError("get_buffer() returned an empty buffer")
            buffer[:count] = head[:count]
            if count == head.nbytes:
                self._inbox.popleft()
            else:
                self._inbox[0] = head[count:]
            self._inbox_bytes -= count
            budget -= count
            if self._inbox_bytes <= self._low_water:
                self.inbox_drained.set()
            receiver.buffer_updated(count)
        return budget

    def _finish_with_eof(self) -> None:
        assert self._receiver is not None
        self._eof_pending = False
        self._receiver.eof_received()
        self._lose(None)

    # --- closing --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close this side: the peer gets the bytes already sent, then eof."""
        if self._closed:
            return
        other = self._other
        self._lose(None)
        if other is not None and not other._closed:
            other.enqueue_eof()
        await asyncio.sleep(0)

    def abort(self) -> None:
        """Close both sides now; the peer gets connection_lost(ConnectionClosedError)."""
        if self._closed:
            return
        self._lose(None)
        self._abort_other()

    def _abort_other(self) -> None:
        other = self._other
        if other is not None and not other._closed:
            other._lose(ConnectionClosedError(f"memory://{other.peer.address}: the peer aborted"))

    def _lose(self, error: TransportError | None) -> None:
        """Mark closed, drop undelivered bytes, wake senders, tell the receiver (soon)."""
        self._closed = True
        self._inbox.clear()
        self._inbox_bytes = 0
        self.inbox_drained.set()
        if self._other is not None:
            self._other.inbox_drained.set()  # our own send() waits on the peer's event
        if self._receiver is not None:
            self._loop.call_soon(self._receiver.connection_lost, error)

    @property
    def closed(self) -> bool:
        """True once this side closed, aborted, or saw the peer leave."""
        return self._closed


class MemoryListener(Listener):
    """A registered memory:// name; see Listener."""

    def __init__(self, name: str, accept: AcceptCallback, high_water: int) -> None:
        self.name = name
        self.url = f"memory://{name}"
        self._accept = accept
        self._high_water = high_water
        self._registry = _listeners_of_running_loop()
        self._registry[name] = self

    def __repr__(self) -> str:
        return f"<MemoryListener {self.url}>"

    def connect_pair(self, client_receiver: ByteReceiver) -> MemoryConnection:
        """Create a connected pair, let accept() pick the server side's receiver."""
        number = next(_connection_numbers)
        client = MemoryConnection(PeerInfo("memory", self.name), self._high_water)
        server = MemoryConnection(PeerInfo("memory", f"{self.name}#{number}"), self._high_water)
        server_receiver = self._accept(server)
        client.attach(server, client_receiver)
        server.attach(client, server_receiver)
        return client

    async def close(self) -> None:
        """Unregister the name; established connections stay open."""
        if self._registry.get(self.name) is self:
            del self._registry[self.name]


class MemoryDriver(Driver):
    """memory://name connections within one process (and one event loop).

    TLS settings are accepted and ignored: the bytes never leave the process.
    """

    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self, *, high_water: int = DEFAULT_HIGH_WATER) -> None:
        if high_water < 1:
            raise ConfigError(f"high_water must be >= 1, got {high_water}")
        self.high_water = high_water

    async def connect(
        self, url: str, receiver: ByteReceiver, *, tls: TLSConfig | None = None
    ) -> MemoryConnection:
        """Connect to a listener registered under the URL's name on this event loop."""
        name = _parse_memory_url(url, allow_empty=False)
        listener = _listeners_of_running_loop().get(name)
        if listener is None:
            raise ConnectError(f"cannot connect to {url}: no memory listener named {name!r}")
        await asyncio.sleep(0)  # a connect is a suspension point on every other driver too
        try:
            return listener.connect_pair(receiver)
        except Exception as exc:
            raise ConnectError(
                f"cannot connect to {url}: the accept callback failed: {describe_error(exc)}"
            ) from exc

    async def listen(
        self,
        url: str,
        accept: AcceptCallback,
        *,
        tls: TLSConfig | None = None,
        gate: HandshakeGate | None = None,
    ) -> MemoryListener:
        """Register `memory://name` (`memory://` alone picks a fresh name; see Listener.url)."""
        name = _parse_memory_url(url, allow_empty=True)
        registry = _listeners_of_running_loop()
        if not name:
            name = f"anonymous-{next(_anonymous_names)}"
            while name in registry:
                name = f"anonymous-{next(_anonymous_names)}"
        if name in registry:
            raise TransportError(f"cannot listen on {url}: the name is already in use")
        return MemoryListener(name, accept, self.high_water)
