"""The public face of the transport: an Endpoint that listens and connects, and a Peer per remote.

    async with Endpoint() as server:
        url = await server.listen("tcp://127.0.0.1:0")
        async for transfer in server.incoming():
            state_dict = await transfer.receive_into(StateDictSink())

    async with Endpoint() as client:
        peer = await client.connect(url)
        await peer.send_state_dict(model.state_dict())

The same code runs over every driver: the URL's scheme picks it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from hmac import compare_digest
from types import TracebackType
from typing import Any

from typing_extensions import Unpack

from transport import metrics, sfm
from transport.drivers import DriverConnection, HandshakeGate, Listener, driver_for
from transport.endpoint.admission import (
    AuthFailures,
    QueuedBudget,
    queued_cost,
    source_of,
    token_travels_in_clear,
)
from transport.endpoint.clock import Clock
from transport.endpoint.config import CHUNK_HEADER_ROOM, EndpointConfig, EndpointOptions
from transport.endpoint.identity import certificate_name, claim_refusal, owner, verified_node
from transport.endpoint.link import Link
from transport.endpoint.peer import Peer
from transport.endpoint.pool import BufferPool
from transport.endpoint.receiving import IncomingTransfer, _give_back
from transport.exceptions import (
    ConfigError,
    ConnectError,
    ConnectionClosedError,
    LocalError,
    TensorwireError,
    WrongEventLoopError,
)
from transport.transfer import (
    DUPLICATE,
    JOINED,
    NEW,
    TERMINAL,
    IncomingRegistry,
    IncomingState,
)
from transport.transfer import headers as transfer_headers
from transport.wire import Buffer

RequestHandler = Callable[
    [Peer, Mapping[str, Any], bytes], Awaitable[tuple[Mapping[str, Any], Buffer]]
]


class Endpoint:
    """Listens on and connects to URLs; every remote is a Peer; transfers arrive in incoming().

    Options are EndpointConfig's fields, as keywords (`Endpoint(chunk_size=1 << 20)`) or as a
    config (`Endpoint(config)`). `clock` is the one time source of every timer (tests pass a
    ManualClock). An endpoint belongs to the event loop it first runs on.
    """

    def __init__(
        self,
        config: EndpointConfig | None = None,
        *,
        clock: Clock | None = None,
        **options: Unpack[EndpointOptions],
    ) -> None:
        base = config or EndpointConfig()
        self.config = base.replace(**options) if options else base
        self.clock = clock or Clock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._incoming: asyncio.Queue[IncomingTransfer] = asyncio.Queue()
        self._listeners: list[Listener] = []
        self._links: set[Link] = set()
        # Peers that connected and that accepted() has not handed out yet; one whose connection
        # ends before it is taken is dropped, so a storm of brief connections leaves nothing.
        self._accepted: dict[Peer, None] = {}
        self._peer_arrived = asyncio.Event()
        self._peers: dict[Link, Peer] = {}
        # A peer is found again by its identity when it reconnects, while anyone (a transfer
        # waiting for it, the application, a live link) still holds it; then it is forgotten.
        self._peers_by_identity: weakref.WeakValueDictionary[tuple[str, str], Peer] = (
            weakref.WeakValueDictionary()
        )
        self._registry = IncomingRegistry()
        self._queued = QueuedBudget(self.config.max_queued_bytes)
        self.manifest_limits = self.config.manifest_limits
        self._transfers: dict[int, IncomingTransfer] = {}  # id(state) -> its public object
        self._request_handler: RequestHandler | None = None
        self._auth_failures = AuthFailures(
            self.config.auth_failure_limit,
            self.config.auth_failure_window,
            self.config.auth_lockout,
        )
        # Connections still in their TLS handshake: they hold a slot, for hello_timeout at most.
        self._handshakes = HandshakeGate(
            self.config.hello_timeout, limit=self.config.max_connections
        )
        self.codec_pool: ThreadPoolExecutor | None = (
            None
            if self.config.compression == "off"
            else ThreadPoolExecutor(self.config.compression_threads, "tensorwire-codec")
        )
        # One pool for every connection, so a reconnect reuses the buffers the dropped connection
        # had touched instead of faulting in fresh pages (and growing RSS) each time.
        buffer_size = self.config.chunk_size + CHUNK_HEADER_ROOM
        self._pool = BufferPool(
            buffer_size, max_idle=self.config.connection_window // buffer_size + 2
        )

    async def __aenter__(self) -> Endpoint:
        self.check_loop()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    def check_loop(self) -> None:
        """Bind to the running loop on first use; using the endpoint from another loop (a script
        that calls asyncio.run() per call, a second thread) is refused with a clear error instead
        of hanging until a timeout."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            raise WrongEventLoopError(
                "tensorwire's async API must be awaited inside a running event loop; "
                "from synchronous code use transport.sync"
            ) from None
        if self._loop is None:
            self._loop = running
        elif running is not self._loop:
            raise WrongEventLoopError(
                "this Endpoint belongs to another event loop (was asyncio.run() called once per "
                "call?): create and use the Endpoint inside one loop, or use transport.sync"
            )

    def on_request(self, handler: RequestHandler) -> None:
        """Serve requests from peers with `await handler(peer, header, body) -> (header, body)`."""
        self._request_handler = handler

    async def listen(self, url: str) -> str:
        """Accept connections on `url`; returns the bound URL (port 0 becomes the real port)."""
        self.check_loop()
        listener = await driver_for(url).listen(
            url, self._accept, tls=self.config.tls, gate=self._handshakes
        )
        self._listeners.append(listener)
        metrics.listening(listener.url)
        return listener.url

    async def connect(self, url: str) -> Peer:
        """Open a connection to the endpoint listening at `url` (reconnected if it drops).

        Fails (ConnectError) when the other side does not answer with its hello within
        `hello_timeout`: a port that accepts and never speaks is not a peer."""
        self.check_loop()
        link = await self.open_link(url)
        peer = Peer(self, link, url)
        self._peers[link] = peer
        return peer

    async def open_link(self, url: str, *, stripe: bool = False) -> Link:
        """A new connection to `url` whose peer said hello (used by connect(), by a Peer that
        reconnects, and for the extra connections of a striped transfer)."""
        link = self._new_link(is_initiator=True)
        timeout = self.config.hello_timeout
        try:
            await self.clock.within(self._dial(link, url, stripe), timeout)
        except TimeoutError:
            link.abort(ConnectError(f"{url} did not say hello within {timeout:g} s"))
            raise ConnectError(
                f"{url} accepted the connection but did not answer as a tensorwire endpoint "
                f"within hello_timeout ({timeout:g} s)"
            ) from None
        except BaseException:
            self._links.discard(link)
            raise
        return link

    async def _dial(self, link: Link, url: str, stripe: bool) -> None:
        driver_connection = await driver_for(url).connect(url, link, tls=self.config.tls)
        hello = {**self._hello(url), **({"stripe": True} if stripe else {})}
        link.attach(driver_connection, hello)
        closed = asyncio.ensure_future(link.closed.wait())
        greeted = asyncio.ensure_future(link.greeted.wait())
        try:
            await asyncio.wait({closed, greeted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            greeted.cancel()
        if link.error is not None:
            raise link.error

    def _hello(self, url: str) -> dict[str, Any]:
        """What we say in HELLO: our token, only where TLS (or the process) keeps it private."""
        token = self.config.token
        if token is None:
            return {}
        if self.config.tls is None and not url.startswith("memory:"):
            raise ConfigError(f"refusing to send the auth token to {url} without TLS")
        return {"token": token}

    async def incoming(self) -> AsyncIterator[IncomingTransfer]:
        """Every transfer any peer opens to this endpoint, in arrival order (a transfer resumed
        on a new connection is not announced again). A transfer not taken yet holds no credit:
        taking them one at a time never blocks the others."""
        self.check_loop()
        while True:
            yield await self._incoming.get()

    async def accepted(self) -> AsyncIterator[Peer]:
        """Every peer that connects to this endpoint's listeners (once, however often it
        reconnects). A peer whose connection ended before it was taken here is dropped: a storm
        of brief connections must not pile up peers nobody will use."""
        self.check_loop()
        while True:
            while not self._accepted:
                self._peer_arrived.clear()
                await self._peer_arrived.wait()
            peer = next(iter(self._accepted))
            del self._accepted[peer]
            yield peer

    async def close(self) -> None:
        """Stop listening, fail what is still being received (the senders learn it at once)
        and close every connection."""
        for listener in self._listeners:
            metrics.listening(listener.url, active=False)
            await listener.close()
        self._listeners.clear()
        closing = ConnectionClosedError("the receiving endpoint is closing")
        for state in self._registry.transfers():
            transfer = self._transfers.get(id(state))
            if transfer is not None:  # fail() is a no-op for one that already ended
                transfer._verdict(state.fail(closing, code=transfer_headers.CLOSING))
        for peer in list(self._peers.values()):
            peer._closing = True
        await asyncio.gather(*(link.close() for link in list(self._links)), return_exceptions=True)
        self._links.clear()
        if self.codec_pool is not None:
            self.codec_pool.shutdown(wait=False, cancel_futures=True)

    # --- links ---------------------------------------------------------------------------------

    def _accept(self, driver_connection: DriverConnection) -> Link:
        held = len(self._links) + self._handshakes.pending
        link = self._new_link(is_initiator=False)
        link.on_hello = self._greeted
        link.attach(
            driver_connection,
            hello_timeout=self.config.hello_timeout,
            min_frame_rate=self.config.min_frame_rate,
            frame_grace=self.config.frame_grace,
        )
        if held >= self.config.max_connections:
            link.refuse("busy", f"this endpoint holds its limit of {held} connections")
            return link
        source = source_of(driver_connection.peer)
        locked = self._auth_failures.locked(source, self.clock.now())
        if locked is not None:
            link.refuse(
                "locked_out",
                f"too many failed authentications from {source}: try again in {locked:.0f} s",
            )
        return link

    def _refusal(self, link: Link) -> str | None:
        """Why an accepted peer may not stay (its token or certificate identity), or None."""
        config = self.config
        token = link.remote_hello.get("token")
        if token is not None and token_travels_in_clear(link.peer):
            scheme = link.peer.scheme if link.peer else "?"
            return (
                f"auth token sent over plain {scheme}:// (without TLS), where anyone on the "
                "path can read it: use the TLS scheme (tcps, grpcs, https)"
            )
        if config.auth_tokens is not None and not (
            isinstance(token, str) and any(compare_digest(token, t) for t in config.auth_tokens)
        ):
            return "no valid auth token"
        identity = link.peer.peer_identity if link.peer else None
        if config.allowed_identities is not None and identity not in config.allowed_identities:
            return f"certificate identity {identity!r} is not allowed"
        return claim_refusal(link)  # a node id is bound to the certificate's name

    def _greeted(self, link: Link) -> None:
        """An accepted connection said hello: refuse it, or a new peer, or a known one back."""
        refusal = self._refusal(link)
        if refusal is not None:
            source = source_of(link.peer)
            if self._auth_failures.failed(source, self.clock.now()):
                refusal += (
                    f"; {source} is locked out for {self.config.auth_lockout:g} s after "
                    f"{self.config.auth_failure_limit} failed authentications"
                )
            link.refuse("unauthorized", refusal)
            return
        peer_info = link.peer
        identity = (peer_info.peer_identity or "" if peer_info else "", link.remote_node or "")
        known = self._peers_by_identity.get(identity) if identity[1] else None
        if known is not None and link.remote_hello.get("stripe"):
            self._peers[link] = known  # an extra connection of a striped transfer
            return
        if known is not None:
            known._replace_link(link)
            self._peers[link] = known
            return
        peer = Peer(self, link)
        self._peers[link] = peer
        if identity[1]:
            self._peers_by_identity[identity] = peer
        self._accepted[peer] = None
        self._peer_arrived.set()

    def _new_link(self, *, is_initiator: bool) -> Link:
        config = self.config
        # Dialing with a client certificate, we are the name in it (the peer refuses any other).
        certified = certificate_name(config.tls) if is_initiator else None
        link = Link(
            config.protocol_config(is_initiator=is_initiator),
            self._pool,
            idle_timeout=config.idle_timeout,
            heartbeat_interval=config.heartbeat_interval,
            router=self,
            on_request=self._serve_request,
            node_id=certified or config.node_id,
            clock=self.clock,
        )
        self._links.add(link)
        link.on_closed = self._forget
        return link

    def _forget(self, link: Link) -> None:
        self._links.discard(link)
        peer = self._peers.pop(link, None)
        if peer is not None and peer._link is link:  # gone before anyone took it: drop it
            self._accepted.pop(peer, None)

    # --- the streams peers open (StreamRouter): the transfer layer decides ---------------------

    def stream_opened(self, link: Link, event: sfm.StreamOpened) -> None:
        key = (link, event.stream_id)
        # Transfers belong to the identity that opened them: ids never cross identities.
        opened = self._registry.on_open(key, event.header, self.clock.now(), owner(link))
        if opened.action == NEW:
            assert opened.transfer is not None
            if not self._queue_admits(link, event, opened.transfer):
                return
            link.receiving += 1
            transfer = IncomingTransfer(
                self, opened.transfer, link, event.stream_id, verified_node(link)
            )
            self._transfers[id(opened.transfer)] = transfer
            self._incoming.put_nowait(transfer)
        elif opened.action == JOINED:
            assert opened.transfer is not None
            link.receiving += 1
            self._transfers[id(opened.transfer)]._joined(link, event.stream_id)
        elif opened.action == DUPLICATE:
            held = [[0, opened.held_chunks]] if opened.held_chunks else []
            link.send_resume(event.stream_id, {"held": held})
        else:
            link.reset_stream(event.stream_id, opened.code, opened.reason)

    def _queue_admits(self, link: Link, event: sfm.StreamOpened, state: IncomingState) -> bool:
        """Admit a new transfer within its owner's budget of queued (untaken) transfers, or
        refuse it (the sender's send fails with the reason; the peer stays)."""
        cost = queued_cost(event.header_size)
        if self._queued.admit(id(state), state.owner, cost):
            return True
        reason = (
            f"this receiver holds {self._queued.held(state.owner)} bytes of transfers from this "
            f"peer that the application has not taken yet; one more ({cost} bytes) is over "
            f"max_queued_bytes={self.config.max_queued_bytes}: retry once they are taken"
        )
        state.fail(LocalError(reason), code="busy")
        self._registry.finished(state)
        link.reset_stream(event.stream_id, "busy", reason)
        return False

    def taken(self, transfer: IncomingTransfer) -> None:
        """The application took the transfer: it no longer counts as queued."""
        self._queued.release(id(transfer._state))

    def stream_event(
        self, link: Link, event: sfm.DataReceived | sfm.StreamEnded | sfm.StreamFailed
    ) -> None:
        key = (link, event.stream_id)
        ended = not isinstance(event, sfm.DataReceived)
        if self._registry.settling(key, ended=ended):
            if isinstance(event, sfm.DataReceived):
                _give_back(link, event)
            elif isinstance(event, sfm.StreamEnded):
                link.complete_stream(event.stream_id)  # the verdict, again
            return
        state = self._registry.route(key)
        transfer = self._transfers.get(id(state)) if state is not None else None
        if transfer is None:
            if isinstance(event, sfm.DataReceived):
                _give_back(link, event)  # a stream we refused or finished: drop its data
            return
        if isinstance(event, sfm.DataReceived):
            transfer._on_data(link, event)
        elif isinstance(event, sfm.StreamEnded):
            transfer._on_end(link, event)
        else:
            transfer._on_stream_failed(link, event)

    def stream_reset(self, link: Link, event: sfm.StreamReset) -> None:
        key = (link, event.stream_id)
        if self._registry.settling(key, ended=True):
            return
        state = self._registry.route(key)
        transfer = self._transfers.get(id(state)) if state is not None else None
        if transfer is not None:
            transfer._on_reset(link, event)

    def link_failed(self, link: Link, error: TensorwireError) -> None:
        """The transfer layer decides what a lost connection means for each transfer on it."""
        now, goodbye = self.clock.now(), link.said_goodbye
        for state in self._registry.connection_lost(link, now, error, said_goodbye=goodbye):
            transfer = self._transfers.get(id(state))
            if transfer is not None:
                transfer._wake()

    # --- the transfer hub (what an IncomingTransfer asks of us) --------------------------------

    def settle(self, transfer: IncomingTransfer) -> None:
        """Forget a transfer that ended (its routes, its object); remember a committed one."""
        state = transfer._state
        if state.state in TERMINAL:
            self._queued.release(id(state))
        if state.state in TERMINAL and self._transfers.pop(id(state), None) is not None:
            for link, _ in state.streams:
                if isinstance(link, Link):
                    link.receiving = max(0, link.receiving - 1)
            self._registry.finished(state)

    async def _serve_request(
        self, link: Link, header: Mapping[str, Any], body: bytes
    ) -> tuple[Mapping[str, Any], Buffer]:
        if self._request_handler is None:
            raise LookupError("no request handler is registered on this endpoint")
        peer = self._peers.get(link) or Peer(self, link)
        return await self._request_handler(peer, header, body)
