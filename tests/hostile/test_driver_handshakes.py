"""Connection slots before accept() over http(s) and grpc(s): connections that stall in their TLS
handshake or their HTTP request headers hold a slot until hello_timeout cuts them, then give back
their file descriptors; an honest transfer on the same endpoint still completes.

Real sockets on loopback, real aiohttp and grpc servers. The deadlines are real time (0.5 s, the
drivers' own timers); every wait is on an event or a condition, bounded generously."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
import torch
import uvloop

from tests.drivers.receivers import RecordingReceiver
from transport import Endpoint, StateDictSink
from transport.drivers import GrpcDriver, GrpcOptions, HttpDriver, TLSConfig
from transport.drivers.base import DriverConnection, HandshakeGate
from transport.exceptions import ConnectionClosedError, TensorwireError

from .conftest import Pki

HELLO_TIMEOUT = 0.5  # real seconds: the drivers' own deadlines
SLOTS = 3
BOUND = 10.0  # seconds any single wait may take before the test fails
PARTIAL_REQUEST = b"POST /tensorwire/v1/connect HTTP/1.1\r\nHost: 127.0.0.1\r\nTensorwire-Dri"


# --- helpers ------------------------------------------------------------------------------------


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (checking every few ms) until `condition()` holds; fail after BOUND seconds."""
    async with asyncio.timeout(BOUND):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


def accepted_sockets(port: int) -> int:
    """Server-side TCP sockets of this process on `port`: the accepted connections' fds."""
    return sum(
        1
        for connection in psutil.Process().net_connections(kind="tcp")
        if connection.laddr and connection.laddr.port == port and connection.raddr
    )


@dataclass
class Stalled:
    """A raw attacker connection that stopped sending."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def hung_up(self) -> None:
        """Wait until the server closes the connection (EOF or reset), then close our end."""
        try:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while await asyncio.wait_for(self.reader.read(1 << 16), BOUND):
                    pass
        finally:
            self.writer.transport.abort()


async def silent(url: str) -> Stalled:
    """TCP connected, then nothing: no ClientHello (https, grpcs), no request line (http)."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    return Stalled(reader, writer)


async def partial_headers(url: str, context: ssl.SSLContext) -> Stalled:
    """A request line and half a header (after a full TLS handshake for https), then nothing."""
    tls = {"ssl": context, "server_hostname": "localhost"} if url.startswith("https") else {}
    reader, writer = await asyncio.open_connection(*host_port(url), **tls)  # type: ignore[arg-type]
    writer.write(PARTIAL_REQUEST)
    await writer.drain()
    return Stalled(reader, writer)


@contextlib.asynccontextmanager
async def serving(scheme: str, pki: Pki) -> AsyncIterator[tuple[Endpoint, str]]:
    """A receiving Endpoint with SLOTS connection slots, listening on `scheme` on loopback."""
    tls = pki.server if scheme.endswith("s") else None
    async with Endpoint(tls=tls, max_connections=SLOTS, hello_timeout=HELLO_TIMEOUT) as server:
        yield server, await server.listen(f"{scheme}://127.0.0.1:0")


def client_settings(url: str, pki: Pki) -> TLSConfig | None:
    return pki.client if url.split("://", 1)[0].endswith("s") else None


async def honest_transfer(server: Endpoint, url: str, pki: Pki) -> None:
    """A state dict sent over `url` arrives bit-exactly."""
    state = {"weight": torch.arange(300_000, dtype=torch.float32), "bias": torch.ones(7)}
    loop = asyncio.get_running_loop()
    received: asyncio.Future[MutableMapping[str, torch.Tensor]] = loop.create_future()

    async def serve() -> None:
        async for transfer in server.incoming():
            received.set_result(await transfer.receive_into(StateDictSink()))
            return

    receiving = asyncio.ensure_future(serve())
    try:
        async with Endpoint(tls=client_settings(url, pki)) as client:
            peer = await asyncio.wait_for(client.connect(url), BOUND)
            await asyncio.wait_for(peer.send_state_dict(state), BOUND)
        got = await asyncio.wait_for(received, BOUND)
    finally:
        receiving.cancel()
    assert set(got) == set(state)
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor)


async def refused_busy(url: str, pki: Pki) -> None:
    """An honest client is refused at once, told that every slot is held."""
    async with Endpoint(tls=client_settings(url, pki)) as honest:
        with pytest.raises(TensorwireError, match=f"limit of {SLOTS} connections"):
            await asyncio.wait_for(honest.connect(url), BOUND)


# --- http(s): TLS handshakes and request headers hold slots until hello_timeout ------------------


@pytest.mark.parametrize(
    ("scheme", "attack"),
    [
        ("https", "silent"),
        ("https", "partial_headers"),
        ("http", "silent"),
        ("http", "partial_headers"),
    ],
)
async def test_stalled_http_admissions_hold_slots_until_hello_timeout(
    pki: Pki, scheme: str, attack: str
) -> None:
    """Connections stalled in TLS or in their headers count against max_connections (an honest
    client is refused "busy"), are cut at hello_timeout and give their fds back; then the slots
    serve an honest transfer."""
    async with serving(scheme, pki) as (server, url):
        port = host_port(url)[1]
        gate = server._handshakes
        if attack == "silent":
            stalled = [await silent(url) for _ in range(SLOTS)]
        else:
            stalled = [await partial_headers(url, pki.raw_context) for _ in range(SLOTS)]
        await until(lambda: gate.pending == SLOTS, f"{SLOTS} connections counted")
        assert accepted_sockets(port) == SLOTS

        await refused_busy(url, pki)

        # hello_timeout cuts them: each attacker sees the server hang up.
        await asyncio.gather(*(attacker.hung_up() for attacker in stalled))
        await until(lambda: gate.pending == 0, "the slots released")
        await until(lambda: accepted_sockets(port) == 0, "the server's fds closed")
        await honest_transfer(server, url, pki)


# --- http(s): what ends an admission early, and what does not ----------------------------------


@contextlib.asynccontextmanager
async def http_listener(
    pki: Pki, scheme: str, gate: HandshakeGate
) -> AsyncIterator[tuple[str, list[DriverConnection]]]:
    """An http(s) listener outside any Endpoint; the accepted connections are listed."""
    accepted: list[DriverConnection] = []

    def accept(connection: DriverConnection) -> RecordingReceiver:
        accepted.append(connection)
        return RecordingReceiver()

    tls = pki.server if scheme == "https" else None
    listener = await HttpDriver().listen(f"{scheme}://127.0.0.1:0", accept, tls=tls, gate=gate)
    try:
        yield listener.url, accepted
    finally:
        await listener.close()
        for connection in accepted:
            connection.abort()


def on_loop(loop: str, scenario: Coroutine[Any, Any, None]) -> None:
    """Run `scenario` on a fresh loop of the kind named: the drivers promise asyncio and uvloop,
    and uvloop reads a new connection before its protocol could stop it."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(scenario)


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_stalled_admissions_are_cut_and_an_honest_connection_passes(
    pki: Pki, scheme: str, loop: str
) -> None:
    on_loop(loop, stalled_then_honest(pki, scheme))


async def stalled_then_honest(pki: Pki, scheme: str) -> None:
    gate = HandshakeGate(HELLO_TIMEOUT)
    async with http_listener(pki, scheme, gate) as (url, accepted):
        stalled = [await silent(url), await partial_headers(url, pki.raw_context)]
        await until(lambda: gate.pending == len(stalled), "the connections counted")
        await asyncio.gather(*(attacker.hung_up() for attacker in stalled))
        await until(lambda: gate.pending == 0, "the slots released")
        await until(lambda: accepted_sockets(host_port(url)[1]) == 0, "the fds closed")
        assert accepted == []
        receiver = RecordingReceiver()
        tls = pki.client if scheme == "https" else None
        client = await HttpDriver().connect(url, receiver, tls=tls)
        await client.send([b"honest bytes"])
        await until(lambda: len(accepted) == 1, "the honest connection accepted")
        await accepted[0].send([b"answered"])
        await receiver.wait_for_bytes(len(b"answered"))
        assert gate.pending == 0
        await client.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_failed_tls_handshake_frees_its_slot_at_once(pki: Pki, loop: str) -> None:
    """Garbage instead of a ClientHello: the slot is free long before the (60 s) deadline."""
    on_loop(loop, failed_handshake(pki))


async def failed_handshake(pki: Pki) -> None:
    gate = HandshakeGate(60.0)
    async with http_listener(pki, "https", gate) as (url, accepted):
        attacker = await silent(url)
        await until(lambda: gate.pending == 1, "the connection counted")
        attacker.writer.write(b"GET / HTTP/1.1\r\n\r\n")  # plain HTTP to a TLS port
        await attacker.hung_up()
        await until(lambda: gate.pending == 0, "the slot released")
        await until(lambda: accepted_sockets(host_port(url)[1]) == 0, "the fd closed")
        assert accepted == []


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_peer_leaving_mid_headers_frees_its_slot_at_once(
    pki: Pki, scheme: str, loop: str
) -> None:
    on_loop(loop, leaves_mid_headers(pki, scheme))


async def leaves_mid_headers(pki: Pki, scheme: str) -> None:
    gate = HandshakeGate(60.0)
    async with http_listener(pki, scheme, gate) as (url, accepted):
        attacker = await partial_headers(url, pki.raw_context)
        await until(lambda: gate.pending == 1, "the connection counted")
        attacker.writer.close()
        await until(lambda: gate.pending == 0, "the slot released")
        await until(lambda: accepted_sockets(host_port(url)[1]) == 0, "the fd closed")
        assert accepted == []


@pytest.mark.parametrize("loop", LOOPS)
def test_oversized_headers_are_refused_and_free_the_slot(pki: Pki, loop: str) -> None:
    """Header bytes cannot pile up: a field over the limit ends the exchange with an HTTP error."""
    on_loop(loop, oversized_headers(pki))


async def oversized_headers(pki: Pki) -> None:
    gate = HandshakeGate(60.0)
    async with http_listener(pki, "http", gate) as (url, _):
        attacker = await silent(url)
        attacker.writer.write(PARTIAL_REQUEST + b"ver: http/1\r\nX-Padding: " + b"a" * 64 * 1024)
        answer = await asyncio.wait_for(attacker.reader.readline(), BOUND)
        assert answer.split()[1] in (b"400", b"431")
        await attacker.hung_up()
        await until(lambda: gate.pending == 0, "the slot released")


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stray_kept_alive_request_is_still_cut_at_the_deadline(pki: Pki, loop: str) -> None:
    """A request for another path is answered, but it does not end the admission: the
    connection, kept alive for a next request, is still cut at gate.timeout."""
    on_loop(loop, stray_request(pki))


async def stray_request(pki: Pki) -> None:
    gate = HandshakeGate(HELLO_TIMEOUT)
    async with http_listener(pki, "http", gate) as (url, _):
        attacker = await silent(url)
        attacker.writer.write(b"GET /elsewhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = await asyncio.wait_for(attacker.reader.readline(), BOUND)
        assert answer.split()[1] in (b"404", b"405")
        assert gate.pending == 1
        await attacker.hung_up()
        await until(lambda: gate.pending == 0, "the slot released")


# --- grpc(s): grpc core's own bounds ------------------------------------------------------------


async def test_grpcs_half_open_tls_connections_are_cut_at_hello_timeout(pki: Pki) -> None:
    """grpc cannot count its handshakes in the gate, but it cuts them at the gate's timeout:
    each raw socket that never sends a ClientHello sees the server hang up."""
    async with serving("grpcs", pki) as (server, url):
        stalled = [await silent(url) for _ in range(SLOTS)]
        await asyncio.gather(*(attacker.hung_up() for attacker in stalled))
        await until(lambda: accepted_sockets(host_port(url)[1]) == 0, "the server's fds closed")
        await honest_transfer(server, url, pki)


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# A HEADERS frame on stream 1 without END_HEADERS: ":method POST", ":scheme http", then no more.
UNFINISHED_HEADERS = b"\x00\x00\x02\x01\x00\x00\x00\x00\x01\x83\x86"


@pytest.mark.parametrize(
    "stall",
    [
        HTTP2_PREFACE,
        HTTP2_PREFACE + EMPTY_SETTINGS,
        HTTP2_PREFACE + EMPTY_SETTINGS + UNFINISHED_HEADERS,
    ],
    ids=["preface", "settings-then-no-call", "unfinished-headers"],
)
async def test_grpc_connections_stalled_before_their_call_are_cut_at_hello_timeout(
    pki: Pki, stall: bytes
) -> None:
    """Past TLS, grpc's HTTP/2 setup and a call's headers are bounded by hello_timeout too."""
    async with serving("grpc", pki) as (server, url):
        attackers = [await silent(url) for _ in range(SLOTS)]
        for attacker in attackers:
            attacker.writer.write(stall)
        await asyncio.gather(*(attacker.hung_up() for attacker in attackers))
        await until(lambda: accepted_sockets(host_port(url)[1]) == 0, "the server's fds closed")
        await honest_transfer(server, url, pki)


async def test_grpc_holds_at_most_gate_limit_connections(pki: Pki) -> None:
    """With gate.limit grpc closes connections above it at accept, before their handshake."""
    accepted: list[DriverConnection] = []

    def accept(connection: DriverConnection) -> RecordingReceiver:
        accepted.append(connection)
        return RecordingReceiver()

    gate = HandshakeGate(60.0, limit=2)
    listener = await GrpcDriver().listen("grpcs://127.0.0.1:0", accept, tls=pki.server, gate=gate)
    try:
        holding = [await silent(listener.url) for _ in range(2)]
        await until(lambda: accepted_sockets(host_port(listener.url)[1]) == 2, "2 accepted")
        over = await silent(listener.url)
        await over.hung_up()  # closed at once: the 60 s handshake deadline is far away
        for attacker in holding:
            assert not attacker.reader.at_eof()
            attacker.writer.transport.abort()
    finally:
        await listener.close()


async def test_grpc_messages_over_the_limit_are_refused_and_sends_are_split() -> None:
    limit = 64 * 1024
    driver = GrpcDriver(GrpcOptions(max_message_size=limit))
    received: list[RecordingReceiver] = []

    def accept(connection: DriverConnection) -> RecordingReceiver:
        received.append(RecordingReceiver())
        return received[-1]

    listener = await driver.listen("grpc://127.0.0.1:0", accept)
    try:
        # Our own driver splits a send bigger than the limit into messages the peer accepts.
        payload = bytes(range(256)) * (5 * limit // 256 + 3)
        client = await driver.connect(listener.url, RecordingReceiver())
        await client.send([payload[:1000], memoryview(payload)[1000:]])
        await asyncio.wait_for(received[0].wait_for_bytes(len(payload)), BOUND)
        assert bytes(received[0].data) == payload
        await client.close()
        # A peer that does not split is refused: one message over the limit ends its call.
        greedy = GrpcDriver(GrpcOptions(max_message_size=4 * limit))
        lost = RecordingReceiver()
        client = await greedy.connect(listener.url, lost)
        with contextlib.suppress(ConnectionClosedError):
            await client.send([bytes(2 * limit)])
        error = await asyncio.wait_for(lost.lost, BOUND)
        assert isinstance(error, ConnectionClosedError)
        assert "RESOURCE_EXHAUSTED" in str(error)
        assert len(received) == 2
        assert not received[1].data
    finally:
        await listener.close()
