"""The public face of the transport: an Endpoint that listens and connects, and a Peer per link.

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
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from transport import sfm
from transport.drivers import DriverConnection, Listener, PeerInfo, TLSConfig, driver_for
from transport.endpoint.link import Link
from transport.endpoint.pool import BufferPool
from transport.endpoint.transfers import (
    IncomingTransfer,
    TransferResult,
    file_blocks,
    send_blocks,
    send_source,
)
from transport.exceptions import ConfigError
from transport.payload import DEFAULT_CHUNK_SIZE, Source, StateDictSource
from transport.wire import DEFAULT_LIMITS, Buffer, Limits

RequestHandler = Callable[
    ["Peer", Mapping[str, Any], bytes], Awaitable[tuple[Mapping[str, Any], Buffer]]
]

# The safetensors header of a chunk is small, but a chunk of many tiny tensors carries one JSON
# entry per tensor; credit and buffers leave this much room above chunk_size for it.
_CHUNK_HEADER_ROOM = 1024 * 1024


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """Everything an endpoint can be tuned by; the defaults are meant to be left alone."""

    node_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    chunk_size: int = DEFAULT_CHUNK_SIZE
    stream_window: int = 32 * 2**20
    connection_window: int = 128 * 2**20
    max_streams: int = 64
    idle_timeout: float = 120.0
    heartbeat_interval: float = 30.0
    tls: TLSConfig | None = None
    limits: Limits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        room = self.chunk_size + _CHUNK_HEADER_ROOM
        if self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.stream_window < room or self.connection_window < room:
            raise ConfigError(
                f"stream_window ({self.stream_window}) and connection_window "
                f"({self.connection_window}) must hold one chunk plus its header ({room} bytes)"
            )
        if self.idle_timeout <= 0:
            raise ConfigError(f"idle_timeout must be positive, got {self.idle_timeout}")

    def protocol_config(self, *, is_initiator: bool) -> sfm.ConnectionConfig:
        return sfm.ConnectionConfig(
            is_initiator=is_initiator,
            stream_window=self.stream_window,
            connection_window=self.connection_window,
            max_streams=self.max_streams,
            limits=self.limits,
        )


class Peer:
    """One connection to a remote endpoint: send to it, ask it, close it."""

    def __init__(self, endpoint: Endpoint, link: Link) -> None:
        self._endpoint = endpoint
        self._link = link

    @property
    def info(self) -> PeerInfo | None:
        """Scheme, address and (under TLS) the verified identity of the peer."""
        return self._link.peer

    @property
    def node_id(self) -> str | None:
        """The node id the peer announced in its hello."""
        return self._link.remote_node

    @property
    def closed(self) -> bool:
        return self._link.error is not None

    async def send_state_dict(
        self,
        state_dict: Mapping[str, torch.Tensor] | Source,
        *,
        meta: Mapping[str, Any] | None = None,
    ) -> TransferResult:
        """Stream a state dict (or any Source) to the peer; returns when the peer has it all."""
        source = (
            state_dict
            if isinstance(state_dict, Source)
            else StateDictSource(state_dict, chunk_size=self._endpoint.config.chunk_size)
        )
        return await send_source(self._link, source, meta)

    async def send_file(
        self, path: str | os.PathLike[str], *, meta: Mapping[str, Any] | None = None
    ) -> TransferResult:
        """Stream a plain file's bytes (checkpoints, datasets, logs) with the same guarantees."""
        file_path = Path(path)
        size = (await asyncio.to_thread(file_path.stat)).st_size
        info = {"name": file_path.name, **(meta or {})}
        blocks = file_blocks(file_path, self._endpoint.config.chunk_size, self._link.stream_window)
        return await send_blocks(self._link, blocks, info, size=size)

    async def send_bytes(
        self,
        blocks: AsyncIterable[Buffer] | Iterable[Buffer],
        *,
        meta: Mapping[str, Any] | None = None,
    ) -> TransferResult:
        """Stream any (async) iterable of byte blocks (split to at most a chunk per DATA frame).

        The driver may still read a block after the next one was asked for, so an iterable must
        not refill a block it already yielded (yield fresh buffers, or a ring larger than the
        window as `send_file` does)."""
        return await send_blocks(
            self._link, _bounded(blocks, self._endpoint.config.chunk_size), meta
        )

    async def request(
        self, header: Mapping[str, Any], body: Buffer = b""
    ) -> tuple[Mapping[str, Any], bytes]:
        """A small request/response exchange beside the streams (RemoteRequestError on failure)."""
        return await self._link.request(header, body)

    async def close(self) -> None:
        await self._link.close()

    async def wait_closed(self) -> None:
        await self._link.closed.wait()


async def _bounded(
    blocks: AsyncIterable[Buffer] | Iterable[Buffer], limit: int
) -> AsyncIterator[memoryview]:
    """Split blocks larger than a chunk so one frame never exceeds the peer's window."""
    if isinstance(blocks, AsyncIterable):
        async for block in blocks:
            for start in range(0, max(len(memoryview(block).cast("B")), 1), limit):
                yield memoryview(block).cast("B")[start : start + limit]
    else:
        for block in blocks:
            view = memoryview(block).cast("B")
            for start in range(0, max(view.nbytes, 1), limit):
                yield view[start : start + limit]


class Endpoint:
    """Listens on and connects to URLs; every connection is a Peer; streams arrive in incoming()."""

    def __init__(self, config: EndpointConfig | None = None, **overrides: Any) -> None:
        base = config or EndpointConfig()
        self.config = EndpointConfig(**{**_fields(base), **overrides}) if overrides else base
        self._incoming: asyncio.Queue[IncomingTransfer] = asyncio.Queue()
        self._listeners: list[Listener] = []
        self._links: set[Link] = set()
        self._peers: asyncio.Queue[Peer] = asyncio.Queue()
        self._request_handler: RequestHandler | None = None

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
        return listener.url

    async def connect(self, url: str) -> Peer:
        """Open a connection to the endpoint listening at `url`."""
        link = self._new_link(is_initiator=True)
        driver_connection = await driver_for(url).connect(url, link, tls=self.config.tls)
        link.attach(driver_connection)
        return Peer(self, link)

    async def incoming(self) -> AsyncIterator[IncomingTransfer]:
        """Every stream any peer opens to this endpoint, in arrival order."""
        while True:
            yield await self._incoming.get()

    async def accepted(self) -> AsyncIterator[Peer]:
        """Every peer that connects to this endpoint's listeners."""
        while True:
            yield await self._peers.get()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        for listener in self._listeners:
            await listener.close()
        self._listeners.clear()
        await asyncio.gather(*(link.close() for link in list(self._links)), return_exceptions=True)
        self._links.clear()

    def _accept(self, driver_connection: DriverConnection) -> Link:
        link = self._new_link(is_initiator=False)
        link.attach(driver_connection)
        self._peers.put_nowait(Peer(self, link))
        return link

    def _new_link(self, *, is_initiator: bool) -> Link:
        config = self.config
        buffer_size = config.chunk_size + _CHUNK_HEADER_ROOM
        pool = BufferPool(buffer_size, max_idle=config.stream_window // buffer_size + 2)
        link = Link(
            config.protocol_config(is_initiator=is_initiator),
            pool,
            idle_timeout=config.idle_timeout,
            heartbeat_interval=config.heartbeat_interval,
            on_incoming=self._incoming.put_nowait,
            on_request=self._serve_request,
            node_id=config.node_id,
        )
        self._links.add(link)
        link.on_closed = self._links.discard
        return link

    async def _serve_request(
        self, link: Link, header: Mapping[str, Any], body: bytes
    ) -> tuple[Mapping[str, Any], Buffer]:
        if self._request_handler is None:
            raise LookupError("no request handler is registered on this endpoint")
        return await self._request_handler(Peer(self, link), header, body)


def _fields(config: EndpointConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in EndpointConfig.__dataclass_fields__}
