"""One live connection: the sans-I/O protocol run over a driver connection.

The link is the only place where the protocol meets asyncio. Bytes from the driver go straight into
the protocol's buffers (get_buffer/buffer_updated, so the socket reads into the payload buffer);
events that come out are routed to the transfer they belong to; frames the protocol queues are
written by one flush at a time, in order, with the driver's back-pressure.

Timeouts follow one rule: a wait fails when nothing has moved on the link for `idle_timeout`
seconds. Heartbeat pings keep idle connections open through middleboxes but do not count as
movement, so a peer that stays connected but never consumes still times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Protocol

from transport import sfm
from transport.drivers import DriverConnection, PeerInfo
from transport.endpoint.clock import Clock
from transport.endpoint.outgoing import OutgoingStreams
from transport.endpoint.pool import BufferPool
from transport.endpoint.requests import Requests
from transport.exceptions import (
    ConnectionClosedError,
    IdleTimeoutError,
    ProtocolError,
    RemoteError,
    TensorwireError,
    TransportError,
    TruncatedFrameError,
)
from transport.metrics import LinkMetrics
from transport.wire import Buffer

log = logging.getLogger("tensorwire.link")

RequestHandler = Callable[
    ["Link", Mapping[str, Any], bytes], Awaitable[tuple[Mapping[str, Any], Buffer]]
]


class StreamRouter(Protocol):
    """Who the link hands the streams the peer opened to (the endpoint's transfer registry)."""

    def stream_opened(self, link: Link, event: sfm.StreamOpened) -> None: ...

    def stream_event(
        self, link: Link, event: sfm.DataReceived | sfm.StreamEnded | sfm.StreamFailed
    ) -> None: ...

    def stream_reset(self, link: Link, event: sfm.StreamReset) -> None: ...

    def link_failed(self, link: Link, error: TensorwireError) -> None: ...


# How long a close waits for the GOAWAY to go out and the driver to close gracefully; a peer
# that does not take them in this time is dropped.
CLOSE_GRACE_S = 10.0

_PROGRESS_EVENTS = (
    sfm.DataReceived,
    sfm.CreditGranted,
    sfm.StreamOpened,
    sfm.StreamEnded,
    sfm.RequestReceived,
    sfm.ResponseReceived,
)

_NEW_WORK_EVENTS = (sfm.StreamOpened, sfm.RequestReceived)


# Bytes a failed link reads into (and drops) at a time while its GOAWAY is flushed.
DISCARD_SIZE = 16 * 1024


class Link:
    """A connection to one peer; create with `Link(...)`, then `attach(driver_connection)`."""

    def __init__(
        self,
        config: sfm.ConnectionConfig,
        pool: BufferPool,
        *,
        idle_timeout: float,
        heartbeat_interval: float,
        router: StreamRouter,
        on_request: RequestHandler | None,
        node_id: str,
        clock: Clock,
    ) -> None:
        self._protocol = sfm.Connection(config, allocate=pool.allocate)
        self._own_stream_window = config.stream_window
        self.pool = pool
        self.idle_timeout = idle_timeout
        # Pings must come well within idle_timeout, or a healthy idle link could look silent.
        self._heartbeat_interval = min(heartbeat_interval, idle_timeout / 3)
        self._router = router
        self.clock = clock
        self._node_id = node_id
        self._driver: DriverConnection | None = None
        self._peer_info: PeerInfo | None = None
        self._write_lock = asyncio.Lock()
        self._flush_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Tasks that only watch a live connection (heartbeat, hello deadline, frame rate): they
        # end with it, or they would keep the link (and its buffers) alive until they wake.
        self._watchers: set[asyncio.Task[Any]] = set()
        self.receiving = 0  # streams the peer sends us here (for metrics)
        self.last_progress = self.last_received = clock.now()
        self.error: TensorwireError | None = None
        self.closed = asyncio.Event()
        self.greeted = asyncio.Event()  # the peer's HELLO arrived
        self.said_goodbye = False  # the peer closed cleanly (a normal GOAWAY)
        self.remote_node: str | None = None
        self.remote_hello: Mapping[str, Any] = {}
        self._discard: memoryview | None = None  # made when first needed (a failed link)
        self.bytes_in = 0
        self.bytes_out = 0
        # The spell of reads that ended inside a frame: when it began and the bytes since then
        # (see _watch_frames). None while the received bytes end on a frame boundary.
        self._frame_started: float | None = None
        self._frame_bytes = 0
        self._frame_begun = asyncio.Event()
        self.on_closed: Callable[[Link], None] | None = None
        self.on_hello: Callable[[Link], None] | None = None
        self.metrics = LinkMetrics()
        # The link's other jobs, each its own object: the streams we send, and requests.
        self.sending = OutgoingStreams(self)
        answer = None if on_request is None else partial(on_request, self)
        self.requests = Requests(self, answer)

    # --- life cycle ----------------------------------------------------------------------------

    def attach(
        self,
        driver: DriverConnection,
        hello: Mapping[str, Any] | None = None,
        hello_timeout: float | None = None,
        min_frame_rate: float = 0.0,
        frame_grace: float = 0.0,
    ) -> None:
        """Bind the driver connection, say hello and start heartbeats.

        With `hello_timeout`, a peer that has not said hello by then is dropped (a connection
        that connects and stalls must not hold a slot for long). With `min_frame_rate`, a peer
        that sends a frame slower than that (bytes/s, after `frame_grace` seconds) is dropped.
        """
        self._driver = driver
        self._peer_info = driver.peer
        self.metrics.opened(driver.peer.scheme, lambda: (len(self.sending), self.receiving))
        self._protocol.send_hello({**(hello or {}), "node": self._node_id})
        self.schedule_flush()
        if self._heartbeat_interval > 0:
            self._watch(self._heartbeat())
        if hello_timeout is not None:
            self._watch(self._require_hello(hello_timeout))
        if min_frame_rate > 0:
            self._watch(self._watch_frames(min_frame_rate, frame_grace))

    async def _watch_frames(self, rate: float, grace: float) -> None:
        """Drop a slow loris: a peer that began a frame and then trickles it. While the bytes
        received end inside a frame, they must average `rate` bytes/s since the first one of
        that spell, checked from `grace` seconds on. Sleeps on the clock only during a spell."""
        clock = self.clock
        while self.error is None:
            await self._frame_begun.wait()
            started = self._frame_started
            if started is None:
                self._frame_begun.clear()
                continue
            due = started + max(grace, self._frame_bytes / rate)
            now = clock.now()
            if now < due:
                await clock.sleep(due - now)
                continue
            self.refuse(
                "too_slow",
                f"{self._frame_bytes} bytes of a frame in {now - started:.1f} s: under the "
                f"minimum of {rate:g} bytes/s",
            )
            return

    def _track_frame(self, nbytes: int) -> None:
        if not self._protocol.receiving_frame:
            self._frame_started = None
            return
        if self._frame_started is None:
            self._frame_started = self.clock.now()
            self._frame_bytes = 0
            self._frame_begun.set()
        self._frame_bytes += nbytes

    async def _require_hello(self, seconds: float) -> None:
        await self.clock.wait(self.greeted, seconds)
        if self.remote_node is None and self.error is None:
            self.refuse("hello_timeout", f"no HELLO within {seconds:g} s")

    def refuse(self, code: str, reason: str) -> None:
        """Drop this connection for cause: tell the peer why (GOAWAY), then abort."""
        if self.error is not None:
            return  # already failing: its own GOAWAY is on the way
        log.warning("refusing peer %s: %s", self._peer_name(), reason)
        # Whatever the protocol queued in answer to the refused peer's frames (the ACK of a
        # stream it opened in the same read as its hello, say) must not reach it: only GOAWAY.
        self._protocol.data_to_send()
        if not self._protocol.closed:
            with contextlib.suppress(TensorwireError):
                self._protocol.close(code, reason)
        self._fail(ConnectionClosedError(f"refused peer {self._peer_name()}: {code}: {reason}"))
        self._spawn(self._flush_then_abort())

    @property
    def stream_window(self) -> int:
        """The most bytes of one stream the peer lets us have in flight (its announced window)."""
        settings = self._protocol.peer_settings
        return settings.stream_window if settings else self._own_stream_window

    @property
    def peer(self) -> PeerInfo | None:
        return self._peer_info

    async def close(self) -> None:
        """Say goodbye, flush what is queued and close the driver connection.

        Waiters are woken first (with ConnectionClosedError), so nothing blocked on credit
        outlives the close; then the GOAWAY and the driver's graceful close get a short grace
        (CLOSE_GRACE_S, or idle_timeout if shorter). A peer that stopped reading behind an open
        socket (a hung process, a proxy gone quiet) is then dropped: closing must not block a
        shutdown for a whole idle_timeout."""
        was_open = self.error is None
        self.metrics.closing()
        if was_open and not self._protocol.closed:
            self._protocol.close("normal", "closing")
        self._fail(ConnectionClosedError("connection closed locally"))
        clock = self.clock
        deadline = clock.now() + min(self.idle_timeout, CLOSE_GRACE_S)
        if was_open:
            with contextlib.suppress(TensorwireError, TimeoutError):
                await clock.within(self.flush(force=True), deadline - clock.now())
        if self._driver is not None:
            try:
                await clock.within(self._driver.close(), max(0.0, deadline - clock.now()))
            except TimeoutError:
                self._driver.abort()
        for task in list(self._tasks):
            task.cancel()

    def abort(self, error: TensorwireError) -> None:
        """Drop the connection at once, without a goodbye."""
        self._fail(error)
        if self._driver is not None:
            self._driver.abort()
        for task in list(self._tasks):
            task.cancel()

    def _fail(self, error: TensorwireError) -> None:
        """The connection is over: wake every waiter with the error, once."""
        if self.error is not None:
            return
        self.error = error
        self.metrics.closed(error)
        self.sending.fail_all(error)
        self._router.link_failed(self, error)
        self.requests.fail_all(error)
        self.closed.set()
        self._frame_begun.set()  # the frame watcher sees the error and ends
        current = asyncio.current_task()
        for task in list(self._watchers):
            if task is not current:
                task.cancel()
        if self.on_closed is not None:
            self.on_closed(self)

    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _watch(self, coroutine: Awaitable[Any]) -> None:
        task = self._spawn(coroutine)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    # --- driver callbacks (ByteReceiver) -------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.error is None:
            try:
                return self._protocol.get_buffer(sizehint)
            except ProtocolError as error:
                self._protocol_failed(error)
        # A failed link drains what still arrives while its GOAWAY is flushed, then aborts.
        if self._discard is None:
            self._discard = memoryview(bytearray(DISCARD_SIZE))
        return self._discard

    def buffer_updated(self, nbytes: int) -> None:
        if self.error is not None:
            return
        self.bytes_in += nbytes
        self.metrics.received(nbytes)
        self.last_received = self.clock.now()
        try:
            self._protocol.buffer_updated(nbytes)
        except ProtocolError as error:
            self._protocol_failed(error)
            return
        self._track_frame(nbytes)
        self._dispatch()

    def eof_received(self) -> None:
        try:
            self._protocol.receive_eof()
        except TruncatedFrameError as error:
            # A connection cut in the middle of a frame is a network failure, not a protocol
            # breach: what was cut can be resumed on a new connection.
            self._dispatch()
            lost = ConnectionClosedError(f"connection to {self._peer_name()} cut inside a frame")
            lost.__cause__ = error
            self._fail(lost)
            return
        except ProtocolError as error:
            self._protocol_failed(error)
            return
        self._dispatch()
        self._fail(ConnectionClosedError(f"peer {self._peer_name()} closed the connection"))

    def connection_lost(self, exc: TransportError | None) -> None:
        self._dispatch()
        self._fail(exc or ConnectionClosedError(f"connection to {self._peer_name()} lost"))
        # The link is part of reference cycles (its streams, requests and tasks point back at
        # it) that only the cyclic collector frees; the driver's objects (a TLS session and its
        # buffers: ~1 MiB) must not wait for that with it.
        self._driver = None

    def _protocol_failed(self, error: ProtocolError) -> None:
        log.warning("peer %s broke the protocol: %s", self._peer_name(), error)
        self._dispatch()
        self._fail(error)
        self._spawn(self._flush_then_abort())

    async def _flush_then_abort(self) -> None:
        with contextlib.suppress(TensorwireError, TimeoutError):
            await self.clock.within(self.flush(force=True), 1.0)
        if self._driver is not None:
            self._driver.abort()

    def _peer_name(self) -> str:
        peer = self.peer
        return self.remote_node or (peer.address if peer else "?")

    # --- events --------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        # Routing a HELLO may accept the peer, which parses what it sent after it: more events.
        while events := self._protocol.events_received():
            for event in events:
                if isinstance(event, _PROGRESS_EVENTS):
                    self.last_progress = self.clock.now()
                if self.error is not None and isinstance(event, _NEW_WORK_EVENTS):
                    continue  # a refused or failed peer opens nothing, asks nothing
                self._route(event)
        self.schedule_flush()

    def _route(self, event: sfm.Event) -> None:
        if isinstance(event, sfm.DataReceived):
            self.metrics.chunk_received(memoryview(event.payload).nbytes)
        if isinstance(event, sfm.DataReceived | sfm.StreamEnded | sfm.StreamFailed):
            self._router.stream_event(self, event)
        elif isinstance(event, sfm.CreditGranted):
            self.sending.on_credit(event.stream_id)
        elif isinstance(event, sfm.StreamCompleted):
            self.sending.on_completed(event.stream_id)
        elif isinstance(event, sfm.ResumeReceived):
            self.sending.on_resume(event)
        elif isinstance(event, sfm.StreamOpened):
            self._open_incoming(event)
        elif isinstance(event, sfm.StreamReset):
            self._stream_reset(event)
        elif isinstance(event, sfm.RequestReceived):
            self._spawn(self.requests.answer(event))
        elif isinstance(event, sfm.ResponseReceived):
            self.requests.on_response(event)
        elif isinstance(event, sfm.HelloReceived):
            self._greeted(event)
        elif isinstance(event, sfm.GoAwayReceived) and event.code != "normal":
            self._fail(RemoteError(f"peer closed the connection: {event.reason}", code=event.code))
        elif isinstance(event, sfm.GoAwayReceived):
            self.said_goodbye = True
            self.metrics.closing()  # a normal goodbye: the close that follows is no error

    def _greeted(self, event: sfm.HelloReceived) -> None:
        self.remote_hello = event.header
        self.remote_node = str(event.header.get("node", "")) or None
        self.greeted.set()
        if self.on_hello is not None:
            self.on_hello(self)  # may refuse the peer (its token, its certificate)
        if self.error is not None:
            return
        # Named in the metrics only once accepted: refused peers add no label.
        self.metrics.named(self.remote_node)
        if self._protocol.holds_hello:
            try:
                self._protocol.accept_peer()
            except ProtocolError as error:
                self._protocol_failed(error)

    def _open_incoming(self, event: sfm.StreamOpened) -> None:
        try:
            self._router.stream_opened(self, event)
        except ProtocolError as error:  # e.g. a manifest announcing absurd sizes
            self.refuse(type(error).__name__, str(error))

    def _stream_reset(self, event: sfm.StreamReset) -> None:
        if not self.sending.on_reset(event):
            self._router.stream_reset(self, event)

    # --- writing -------------------------------------------------------------------------------

    @property
    def protocol(self) -> sfm.Connection:
        return self._protocol

    def moved(self) -> None:
        """Something moved on the link (a chunk went out): idle waits start over."""
        self.last_progress = self.clock.now()

    def schedule_flush(self) -> None:
        """Make sure what the protocol queued gets written. A flush task already running takes
        it: that task only ends once it saw the outbox empty (see _flush_quietly)."""
        if self._protocol.pending_send_bytes and (
            self._flush_task is None or self._flush_task.done()
        ):
            self._flush_task = asyncio.ensure_future(self._flush_quietly())

    async def _flush_quietly(self) -> None:
        # Loop until the outbox is empty: frames queued while a write was in flight (a CREDIT
        # from a chunk consumed meanwhile, the ACK of an END) found this task running, so
        # _schedule_flush started no other; without another round they would wait for some
        # later flush (the next heartbeat), while the peer waits for them. The check and the
        # end of the task happen in one step, so nothing queued can slip between them.
        with contextlib.suppress(TensorwireError):
            while self._protocol.pending_send_bytes:
                await self.flush()

    async def flush(self, *, force: bool = False) -> None:
        """Write everything the protocol has queued, in order, honouring back-pressure."""
        async with self._write_lock:
            if self.error is not None and not force:
                raise self.error
            parts = self._protocol.data_to_send()
            if not parts or self._driver is None:
                return
            nbytes = sum(memoryview(part).nbytes for part in parts)
            self.bytes_out += nbytes
            self.metrics.sent(nbytes)
            try:
                await self._driver.send(parts)
            except TransportError as error:
                self._fail(error)
                raise

    # --- waiting -------------------------------------------------------------------------------

    async def wait_progress(self, event: asyncio.Event, what: str) -> None:
        """Wait for `event`; fail only if nothing moved on the link for idle_timeout (counted
        from the start of this wait at the earliest: an idle spell before it does not count)."""
        clock = self.clock
        started = clock.now()
        while not event.is_set():
            moved = max(started, self.last_progress)
            remaining = moved + self.idle_timeout - clock.now()
            if remaining <= 0:
                raise IdleTimeoutError(
                    f"nothing moved for {self.idle_timeout:g} s while waiting for {what} "
                    f"(peer {self._peer_name()})"
                )
            await clock.wait(event, remaining)

    async def _heartbeat(self) -> None:
        """Ping so middleboxes see traffic; drop a peer that sent nothing (not even a PONG) for
        idle_timeout: it is gone, whatever the socket says."""
        while self.error is None:
            await self.clock.sleep(self._heartbeat_interval)
            silent = self.clock.now() - self.last_received
            if silent > self.idle_timeout and self.error is None:
                self._fail(IdleTimeoutError(f"peer {self._peer_name()} silent for {silent:.0f} s"))
                if self._driver is not None:
                    self._driver.abort()
            elif self.error is None and not self._protocol.closed:
                self._protocol.send_ping()
                self.schedule_flush()

    def reset_stream(self, stream_id: int, code: str, reason: str) -> None:
        """Abandon a stream in either direction and tell the peer why."""
        self.sending.forget(stream_id)
        if self.error is None:
            with contextlib.suppress(TensorwireError):
                self._protocol.reset_stream(stream_id, code, reason)
            self.schedule_flush()

    # --- streams in ----------------------------------------------------------------------------

    def consumed(self, stream_id: int, nbytes: int) -> None:
        """The application took `nbytes` of a stream: return that credit to the peer."""
        if self.error is None:
            self._protocol.consumed(stream_id, nbytes)
            self.schedule_flush()

    def send_resume(self, stream_id: int, header: Mapping[str, Any]) -> None:
        """Tell the sender of a stream which chunks we already hold."""
        self._quietly(lambda: self._protocol.send_resume(stream_id, header))

    def grant_stream(self, stream_id: int) -> None:
        """The application took the stream's transfer: give it its whole window."""
        self._quietly(lambda: self._protocol.grant_stream(stream_id))

    def complete_stream(self, stream_id: int) -> None:
        """The verdict: the transfer this stream carried was committed (the final ACK)."""
        self._quietly(lambda: self._protocol.complete_stream(stream_id))

    def _quietly(self, verb: Callable[[], None]) -> None:
        """A verb on a stream the connection may have lost meanwhile: nothing to do then."""
        if self.error is None:
            with contextlib.suppress(TensorwireError):
                verb()
            self.schedule_flush()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
