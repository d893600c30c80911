"""A server endpoint under attack, an honest client beside the attacker, and a raw attacker that
writes whatever bytes it likes through the same driver."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from transport import DigestSink, Endpoint, SyntheticSource
from transport.drivers import driver_for
from transport.wire import Frame, FrameParser, FrameType, encode_frame

MIB = 1 << 20
DRIVERS = ["memory", "tcp", "grpc", "http"]
SERVER_SETTINGS = {
    "chunk_size": MIB,
    "stream_window": 4 * MIB,
    "hello_timeout": 0.5,
    "max_connections": 64,
}


@dataclass
class RawReceiver:
    """Collects what the server sends the attacker, and whether it hung up."""

    data: bytearray = field(default_factory=bytearray)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    credited: asyncio.Event = field(default_factory=asyncio.Event)  # a CREDIT frame arrived
    _buffer: bytearray = field(default_factory=lambda: bytearray(1 << 16))

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self._buffer[:nbytes]
        if any(frame.type is FrameType.CREDIT for frame in self.frames()):
            self.credited.set()

    def eof_received(self) -> None:
        self.closed.set()

    def connection_lost(self, exc: object) -> None:
        self.closed.set()

    def frames(self) -> list[Frame]:
        parser = FrameParser()
        try:
            return parser.feed(bytes(self.data))
        except Exception:
            return []

    def goaway_code(self) -> str | None:
        for frame in self.frames():
            if frame.type is FrameType.GOAWAY:
                return str(frame.header.get("code"))
        return None


def hello() -> bytes:
    settings = {
        "stream_window": 4 * MIB,
        "connection_window": 16 * MIB,
        "max_streams": 8,
        "max_pending_requests": 8,
    }
    header = {"protocol": 1, "node": "attacker", "sfm": settings}
    return raw(FrameType.HELLO, header=header)


def raw(ftype: FrameType, **fields: object) -> bytes:
    return b"".join(bytes(part) for part in encode_frame(ftype, **fields).parts)  # type: ignore[arg-type]


@dataclass
class Arena:
    """The server under test, its URL, and an honest transfer running beside the attacks."""

    server: Endpoint
    url: str
    honest: asyncio.Future[int]

    async def attack(
        self,
        payload: bytes | list[bytes],
        *,
        close: bool = False,
        once_credited: list[bytes] = (),  # type: ignore[assignment]
    ) -> RawReceiver:
        """Connect raw, write `payload` (pieces in order), then `once_credited` after the server
        granted credit (a stream gets it once the application takes its transfer), and wait
        until the server hangs up."""
        receiver = RawReceiver()
        connection = await driver_for(self.url).connect(self.url, receiver)
        for piece in payload if isinstance(payload, list) else [payload]:
            await connection.send([piece])
        if once_credited:
            await asyncio.wait_for(receiver.credited.wait(), 10)
        for piece in once_credited:
            await connection.send([piece])
        if close:
            await connection.close()
        await asyncio.wait_for(receiver.closed.wait(), 10)
        connection.abort()
        return receiver

    async def honest_completes(self) -> None:
        assert await asyncio.wait_for(self.honest, 60) == 48 * MIB


@pytest.fixture(params=DRIVERS)
async def arena(request: pytest.FixtureRequest) -> AsyncIterator[Arena]:
    scheme = request.param
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)
    listen = f"memory://{name}" if scheme == "memory" else "tcp://127.0.0.1:0"
    async with Endpoint(**SERVER_SETTINGS) as server:
        url = await server.listen(listen)

        receiving: set[asyncio.Future[object]] = set()

        async def serve() -> None:
            async for transfer in server.incoming():
                if transfer.meta.get("hold"):
                    continue  # the application never reads this one: no credit comes back
                receiving.add(asyncio.ensure_future(transfer.receive_into(DigestSink())))

        serving = asyncio.ensure_future(serve())
        async with Endpoint(chunk_size=MIB, stream_window=4 * MIB) as client:
            peer = await client.connect(url)
            # Slow enough to still be running while the attacks happen.
            source = SyntheticSource(48 * MIB, seed=2, tensor_bytes=4 * MIB, chunk_size=MIB)

            async def honest() -> int:
                result = await peer.send_state_dict(source)
                return result.bytes

            yield Arena(server, url, asyncio.ensure_future(honest()))
        serving.cancel()
