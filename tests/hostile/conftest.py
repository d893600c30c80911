"""A server endpoint under attack, an honest client beside the attacker, and a raw attacker that
writes whatever bytes it likes through the same driver.

The server runs on a manual clock: an attacker that stalls is dropped when the test moves the
clock past hello_timeout, not after a real wait."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from transport import DigestSink, Endpoint, SyntheticSource
from transport.certs import client_tls, create_pki, server_tls
from transport.drivers import TLSConfig, driver_for
from transport.endpoint.clock import ManualClock
from transport.exceptions import TransportError
from transport.wire import Frame, FrameParser, FrameType, encode_frame

MIB = 1 << 20
DRIVERS = ["memory", "tcp", "tcps", "grpc", "grpcs", "http", "https"]
TLS_SCHEMES = {"tcps", "grpcs", "https"}
HELLO_TIMEOUT = 0.5  # manual seconds
SERVER_SETTINGS = {
    "chunk_size": MIB,
    "stream_window": 4 * MIB,
    "hello_timeout": HELLO_TIMEOUT,
    "max_connections": 64,
    # Small enough that a few queued manifests reach it (the default is 64 MiB).
    "max_queued_bytes": 16 * MIB,
}


@dataclass
class RawReceiver:
    """Collects what the server sends the attacker, and whether it hung up."""

    data: bytearray = field(default_factory=bytearray)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    credited: asyncio.Event = field(default_factory=asyncio.Event)  # a CREDIT frame arrived
    greeted: asyncio.Event = field(default_factory=asyncio.Event)  # the server's HELLO arrived
    _buffer: bytearray = field(default_factory=lambda: bytearray(1 << 16))
    reset: bool = False  # the connection was refused before any byte was exchanged

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self._buffer[:nbytes]
        types = {frame.type for frame in self.frames()}
        if FrameType.CREDIT in types:
            self.credited.set()
        if FrameType.HELLO in types:
            self.greeted.set()

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
        if self.reset:
            return "reset"
        for frame in self.frames():
            if frame.type is FrameType.GOAWAY:
                return str(frame.header.get("code"))
        return None


class _Gone:
    """The connection of an attacker that was reset while connecting."""

    def abort(self) -> None:
        pass

    async def send(self, parts: list[bytes]) -> None:
        pass


def hello(node: str = "attacker") -> bytes:
    settings = {
        "stream_window": 4 * MIB,
        "connection_window": 16 * MIB,
        "max_streams": 8,
        "max_pending_requests": 8,
    }
    header = {"protocol": 1, "node": node, "sfm": settings}
    return raw(FrameType.HELLO, header=header)


def raw(ftype: FrameType, **fields: object) -> bytes:
    return b"".join(bytes(part) for part in encode_frame(ftype, **fields).parts)  # type: ignore[arg-type]


async def first_of(*events: asyncio.Event) -> None:
    """Return once any of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@dataclass
class Arena:
    """The server under test (on `clock`), its URL, and an honest transfer running beside the
    attacks."""

    server: Endpoint
    clock: ManualClock
    url: str
    honest: asyncio.Future[int]
    attacker_tls: TLSConfig | None = None  # trusts the server's CA; presents no certificate

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
        receiver, connection = await self.connect(payload)
        if once_credited:
            await asyncio.wait_for(receiver.credited.wait(), 10)
        for piece in once_credited:
            await connection.send([piece])
        if close:
            await connection.close()
        return await self.hung_up(receiver, connection)

    async def stall(self, payloads: list[bytes | list[bytes]]) -> list[RawReceiver]:
        """Attackers that never finish a HELLO: once the server greeted (or refused) every one,
        the clock moves past hello_timeout, and each waits until the server hangs up."""
        opened = await asyncio.gather(*(self.connect(payload) for payload in payloads))
        await asyncio.wait_for(
            asyncio.gather(*(first_of(seen.greeted, seen.closed) for seen, _ in opened)), 10
        )
        # Short of hello_timeout + 1 s: the GOAWAY a refusal flushes has that long (in clock
        # time) before the connection is aborted, and must still be delivered.
        await self.clock.advance(HELLO_TIMEOUT + 0.1)
        return await asyncio.gather(*(self.hung_up(*pair) for pair in opened))

    async def connect(self, payload: bytes | list[bytes]) -> tuple[RawReceiver, Any]:
        """Connect raw and write `payload` (pieces in order)."""
        receiver = RawReceiver()
        try:
            connection = await driver_for(self.url).connect(
                self.url, receiver, tls=self.attacker_tls
            )
        except TransportError:  # reset before the exchange began (http refusing when busy)
            receiver.reset = True
            receiver.closed.set()
            return receiver, _Gone()
        for piece in payload if isinstance(payload, list) else [payload]:
            try:
                await connection.send([piece])
            except TransportError:  # refused at once (busy, locked out): what it was told counts
                break
        return receiver, connection

    async def hung_up(self, receiver: RawReceiver, connection: Any) -> RawReceiver:
        await asyncio.wait_for(receiver.closed.wait(), 10)
        connection.abort()
        return receiver

    async def honest_completes(self) -> None:
        assert await asyncio.wait_for(self.honest, 60) == 48 * MIB


@pytest.fixture(scope="session")
def arena_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("arena-pki")
    create_pki(directory, clients=["honest"])
    return directory


@pytest.fixture(params=DRIVERS)
async def arena(request: pytest.FixtureRequest, arena_pki: Path) -> AsyncIterator[Arena]:
    scheme = request.param
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)
    listen = f"memory://{name}" if scheme == "memory" else f"{scheme}://127.0.0.1:0"
    clock = ManualClock()
    tls = scheme in TLS_SCHEMES
    server_side = server_tls(arena_pki, require_client_cert=False) if tls else None
    client_side = client_tls(arena_pki, "honest") if tls else None
    attacker = TLSConfig(ca_file=str(arena_pki / "ca.pem")) if tls else None
    async with Endpoint(clock=clock, tls=server_side, **SERVER_SETTINGS) as server:
        url = await server.listen(listen)

        receiving: set[asyncio.Future[object]] = set()

        async def serve() -> None:
            async for transfer in server.incoming():
                if transfer.meta.get("hold"):
                    continue  # the application never reads this one: no credit comes back
                receiving.add(asyncio.ensure_future(transfer.receive_into(DigestSink())))

        serving = asyncio.ensure_future(serve())
        async with Endpoint(chunk_size=MIB, stream_window=4 * MIB, tls=client_side) as client:
            peer = await client.connect(url)
            # Slow enough to still be running while the attacks happen.
            source = SyntheticSource(48 * MIB, seed=2, tensor_bytes=4 * MIB, chunk_size=MIB)

            async def honest() -> int:
                result = await peer.send_state_dict(source)
                return result.bytes

            yield Arena(server, clock, url, asyncio.ensure_future(honest()), attacker)
        serving.cancel()


@dataclass
class Pki:
    """A server's and a client's TLS settings, and a raw client's SSL context (trusts the CA)."""

    server: TLSConfig
    client: TLSConfig
    raw_context: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory: Path = tmp_path_factory.mktemp("slots-pki")
    files = create_pki(directory, clients=["site-1"])
    context = ssl.create_default_context(cafile=str(files["ca"].cert_file))
    return Pki(
        server_tls(directory, require_client_cert=False),
        client_tls(directory, "site-1"),
        context,
    )
