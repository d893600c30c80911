"""Connection slots before accept() over http(s) and grpc(s): connections that stall in their TLS
handshake or their HTTP request headers hold a slot until hello_timeout cuts them, then give back
their file descriptors; an honest transfer on the same endpoint still completes.

Real sockets on loopback, real aiohttp and grpc servers. The deadlines are real time (0.5 s, the
drivers' own timers); every wait is on an event or a condition, bounded generously."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from transport import Endpoint, StateDictSink
from transport.certs import client_tls, create_pki, server_tls
from transport.drivers import TLSConfig
from transport.exceptions import TensorwireError

HELLO_TIMEOUT = 0.5  # real seconds: the drivers' own deadlines
SLOTS = 3
BOUND = 10.0  # seconds any single wait may take before the test fails
PARTIAL_REQUEST = b"POST /tensorwire/v1/connect HTTP/1.1\r\nHost: 127.0.0.1\r\nTensorwire-Dri"


@dataclass
class Pki:
    server: TLSConfig
    client: TLSConfig
    raw_context: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory: Path = tmp_path_factory.mktemp("handshake-pki")
    files = create_pki(directory, clients=["site-1"])
    context = ssl.create_default_context(cafile=str(files["ca"].cert_file))
    return Pki(
        server_tls(directory, require_client_cert=False),
        client_tls(directory, "site-1"),
        context,
    )


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
    received: asyncio.Future[dict[str, torch.Tensor]] = asyncio.get_running_loop().create_future()

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
