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
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from hmac import compare_digest
from types import TracebackType
from typing import Any

from transport import metrics
from transport.drivers import DriverConnection, Listener, driver_for
from transport.endpoint.config import CHUNK_HEADER_ROOM, EndpointConfig
from transport.endpoint.link import Link
from transport.endpoint.peer import Peer
from transport.endpoint.pool import BufferPool
from transport.endpoint.receiving import IncomingTransfer
from transport.exceptions import ConfigError
from transport.wire import Buffer

# Completed transfers remembered so that a sender which lost our final ACK and reopens one is
# answered "all held" instead of delivering the transfer to the application a second time.
_COMPLETED_REMEMBERED = 1024

RequestHandler = Callable[
    [Peer, Mapping[str, Any], bytes], Awaitable[tuple[Mapping[str, Any], Buffer]]
]


class Endpoint:
    """Listens on and connects to URLs; every remote is a Peer; streams arrive in incoming()."""

    def __init__(self, config: EndpointConfig | None = None, **overrides: Any) -> None:
        base = config or EndpointConfig()
        self.config = base.replace(**overrides) if overrides else base
        self._incoming: asyncio.Queue[IncomingTransfer] = asyncio.Queue()
        self._listeners: list[Listener] = []
        self._links: set[Link] = set()
        self._accepted: asyncio.Queue[Peer] = asyncio.Queue()
        self._peers: dict[Link, Peer] = {}
        self._peers_by_identity: dict[tuple[str, str], Peer] = {}
        self._resumable: dict[str, IncomingTransfer] = {}
        self._completed: OrderedDict[str, int] = OrderedDict()  # transfer id -> chunks
        self._tasks: set[asyncio.Task[None]] = set()
        self._request_handler: RequestHandler | None = None
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
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    def on_request(self, handler: RequestHandler) -> None:
        """Serve requests from peers with `await handler(peer, header, body) -> (header, body)`."""
        self._request_handler = handler

    async def listen(self, url: str) -> str:
        """Accept connections on `url`; returns the bound URL (port 0 becomes the real port)."""
        listener = await driver_for(url).listen(url, self._accept, tls=self.config.tls)
        self._listeners.append(listener)
        metrics.listening(listener.url)
        return listener.url

    async def connect(self, url: str) -> Peer:
        """Open a connection to the endpoint listening at `url` (reconnected if it drops)."""
        link = await self.open_link(url)
        peer = Peer(self, link, url)
        self._peers[link] = peer
        return peer

    async def open_link(self, url: str, *, stripe: bool = False) -> Link:
        """A new connection to `url` (used by connect(), by a Peer that reconnects, and for the
        extra connections of a striped transfer, which say so in their hello)."""
        link = self._new_link(is_initiator=True)
        try:
            driver_connection = await driver_for(url).connect(url, link, tls=self.config.tls)
        except BaseException:
            self._links.discard(link)
            raise
        hello = {**self._hello(url), **({"stripe": True} if stripe else {})}
        link.attach(driver_connection, hello)
        return link

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
        on a new connection is not announced again)."""
        while True:
            yield await self._incoming.get()

    async def accepted(self) -> AsyncIterator[Peer]:
        """Every peer that connects to this endpoint's listeners (once, however often it
        reconnects)."""
        while True:
            yield await self._accepted.get()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        for listener in self._listeners:
            metrics.listening(listener.url, active=False)
            await listener.close()
        self._listeners.clear()
        for peer in list(self._peers.values()):
            peer._closing = True
        await asyncio.gather(*(link.close() for link in list(self._links)), return_exceptions=True)
        self._links.clear()
        if self.codec_pool is not None:
            self.codec_pool.shutdown(wait=False, cancel_futures=True)

    # --- links ---------------------------------------------------------------------------------

    def _accept(self, driver_connection: DriverConnection) -> Link:
        held = len(self._links)
        link = self._new_link(is_initiator=False)
        link.on_hello = self._greeted
        link.attach(driver_connection, hello_timeout=self.config.hello_timeout)
        if held >= self.config.max_connections:
            link.refuse("busy", f"this endpoint holds its limit of {held} connections")
        return link

    def _refusal(self, link: Link) -> str | None:
        """Why an accepted peer may not stay (its token or certificate identity), or None."""
        config = self.config
        token = link.remote_hello.get("token")
        if config.auth_tokens is not None and not (
            isinstance(token, str) and any(compare_digest(token, t) for t in config.auth_tokens)
        ):
            return "no valid auth token"
        identity = link.peer.peer_identity if link.peer else None
        if config.allowed_identities is not None and identity not in config.allowed_identities:
            return f"certificate identity {identity!r} is not allowed"
        return None

    def _greeted(self, link: Link) -> None:
        """An accepted connection said hello: refuse it, or a new peer, or a known one back."""
        refusal = self._refusal(link)
        if refusal is not None:
            link.refuse("unauthorized", refusal)
            return
        peer_info = link.peer
        identity = (peer_info.peer_identity or "" if peer_info else "", link.remote_node or "")
        known = self._peers_by_identity.get(identity) if identity[1] else None
        if known is not None and link.remote_hello.get("stripe"):
            self._peers[link] = known  # an extra connection of a striped transfer
            return
        if known is not None:
            known.replace_link(link)
            self._peers[link] = known
            return
        peer = Peer(self, link)
        self._peers[link] = peer
        if identity[1]:
            self._peers_by_identity[identity] = peer
        self._accepted.put_nowait(peer)

    def _new_link(self, *, is_initiator: bool) -> Link:
        config = self.config
        link = Link(
            config.protocol_config(is_initiator=is_initiator),
            self._pool,
            idle_timeout=config.idle_timeout,
            heartbeat_interval=config.heartbeat_interval,
            on_open=self._opened,
            on_request=self._serve_request,
            node_id=config.node_id,
        )
        self._links.add(link)
        link.on_closed = self._forget
        return link

    def _forget(self, link: Link) -> None:
        self._links.discard(link)
        self._peers.pop(link, None)

    # --- transfers -------------------------------------------------------------------------------

    def _opened(
        self, link: Link, stream_id: int, header: Mapping[str, Any]
    ) -> IncomingTransfer | None:
        """A stream the peer opened: resume a transfer we already have, or announce a new one."""
        transfer_id = header.get("transfer")
        known = self._resumable.get(transfer_id) if isinstance(transfer_id, str) else None
        if known is not None:
            return known if known.reattach(link, stream_id, header) else None
        transfer = IncomingTransfer(link, stream_id, header)
        done_chunks = self._completed.get(transfer.transfer_id or "")
        if transfer.resumable and done_chunks is not None:
            task = asyncio.ensure_future(transfer.settle_duplicate(done_chunks))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return transfer
        if transfer.resumable and transfer.transfer_id is not None:
            self._resumable[transfer.transfer_id] = transfer
            transfer.on_done = self._transfer_done
        self._incoming.put_nowait(transfer)
        return transfer

    def _transfer_done(self, transfer: IncomingTransfer, ok: bool) -> None:
        if transfer.transfer_id is None:
            return
        self._resumable.pop(transfer.transfer_id, None)
        if ok:
            self._completed[transfer.transfer_id] = transfer.held_count
            while len(self._completed) > _COMPLETED_REMEMBERED:
                self._completed.popitem(last=False)

    async def _serve_request(
        self, link: Link, header: Mapping[str, Any], body: bytes
    ) -> tuple[Mapping[str, Any], Buffer]:
        if self._request_handler is None:
            raise LookupError("no request handler is registered on this endpoint")
        peer = self._peers.get(link) or Peer(self, link)
        return await self._request_handler(peer, header, body)
