"""Connection slots against hostile peers: tokens sent in the clear, token guessing (a lockout per
source address, on the endpoint's clock), on real loopback sockets with raw attackers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import pytest

from transport import Endpoint
from transport.drivers import driver_for
from transport.endpoint.clock import ManualClock
from transport.exceptions import TensorwireError
from transport.wire import Frame, FrameParser, FrameType

from .conftest import Pki, RawReceiver, raw

TOKEN = "the right token"
ATTACKER_HOST = "127.0.0.2"  # Linux routes all of 127/8 to loopback: a second source address


def hello_with(token: str | None, node: str = "attacker") -> bytes:
    settings = {
        "stream_window": 4 << 20,
        "connection_window": 16 << 20,
        "max_streams": 8,
        "max_pending_requests": 8,
    }
    header: dict[str, object] = {"protocol": 1, "node": node, "sfm": settings}
    if token is not None:
        header["token"] = token
    return raw(FrameType.HELLO, header=header)


def goaway(frames: list[Frame]) -> tuple[str, str] | None:
    for frame in frames:
        if frame.type is FrameType.GOAWAY:
            return str(frame.header.get("code")), str(frame.header.get("reason"))
    return None


async def raw_tls_attempt(
    url: str, context: ssl.SSLContext, hello: bytes, *, source: str = ATTACKER_HOST
) -> tuple[str, str] | None:
    """Connect over TLS from `source`, say `hello`, and read until the server hangs up or
    greets us back without a refusal (then None: the server kept the connection)."""
    host, port = url.removeprefix("tcps://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=context, server_hostname="localhost", local_addr=(source, 0)
    )
    writer.write(hello)
    data = b""
    try:
        while True:
            frames = _frames(data)
            refusal = goaway(frames)
            if refusal is not None:
                return refusal
            chunk = await asyncio.wait_for(reader.read(1 << 16), 10)
            if not chunk:
                return goaway(_frames(data))
            data += chunk
            # The server's HELLO and then, if refused, its GOAWAY: a greeting followed by a
            # PING-answer exchange shows the connection stayed up.
            if (
                any(f.type is FrameType.HELLO for f in _frames(data))
                and goaway(_frames(data)) is None
            ):
                writer.write(raw(FrameType.PING, offset=7))
                while not any(f.type is FrameType.PONG for f in _frames(data)):
                    if goaway(_frames(data)) is not None:
                        return goaway(_frames(data))
                    chunk = await asyncio.wait_for(reader.read(1 << 16), 10)
                    if not chunk:
                        return goaway(_frames(data))
                    data += chunk
                return goaway(_frames(data))
    except (ConnectionError, ssl.SSLError):
        return goaway(_frames(data))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def _frames(data: bytes) -> list[Frame]:
    try:
        return FrameParser().feed(data)
    except Exception:
        return []


@pytest.fixture
async def locked_server(pki: Pki) -> AsyncIterator[tuple[Endpoint, ManualClock, str]]:
    clock = ManualClock()
    async with Endpoint(
        clock=clock,
        tls=pki.server,
        auth_tokens=frozenset({TOKEN}),
        auth_failure_limit=3,
        auth_failure_window=60.0,
        auth_lockout=300.0,
        hello_timeout=5.0,
    ) as server:
        yield server, clock, await server.listen("tcps://127.0.0.1:0")


async def test_token_over_plain_tcp_is_refused() -> None:
    """The library's client sends a token only over TLS (or memory://); a raw client that sends
    one over plain tcp is refused, whether or not the token is right."""
    async with Endpoint(auth_tokens=frozenset({TOKEN}), hello_timeout=5.0) as server:
        url = await server.listen("tcp://127.0.0.1:0")
        receiver = RawReceiver()
        connection = await driver_for(url).connect(url, receiver)
        await connection.send([hello_with(TOKEN)])
        await asyncio.wait_for(receiver.closed.wait(), 10)
        connection.abort()
        refusal = goaway(receiver.frames())
        assert refusal is not None
        code, reason = refusal
        assert code == "unauthorized"
        assert "without TLS" in reason


async def test_token_over_memory_is_accepted() -> None:
    async with Endpoint(auth_tokens=frozenset({TOKEN})) as server:
        url = await server.listen("memory://slots-token-memory")
        async with Endpoint(token=TOKEN) as client:
            peer = await client.connect(url)
            accepted = await asyncio.wait_for(anext(server.accepted()), 10)
            assert accepted is not None
            assert peer is not None


async def test_wrong_tokens_lock_the_source_out(
    pki: Pki, locked_server: tuple[Endpoint, ManualClock, str]
) -> None:
    server, clock, url = locked_server
    accepted = server.accepted()
    for attempt in range(3):
        refusal = await raw_tls_attempt(url, pki.raw_context, hello_with(f"guess {attempt}"))
        assert refusal is not None
        assert refusal[0] == "unauthorized"
    assert "locked out" in refusal[1]
    # Locked out: even the right token is refused at once, before any HELLO is read.
    refusal = await raw_tls_attempt(url, pki.raw_context, hello_with(TOKEN))
    assert refusal is not None
    assert refusal[0] == "locked_out"
    # An honest client from another address is not affected.
    async with Endpoint(tls=pki.client, token=TOKEN) as honest:
        await honest.connect(url)
        # Taken while it is connected: a peer gone before the application took it is dropped.
        await asyncio.wait_for(anext(accepted), 10)
    # The lockout ends on the endpoint's clock (no real wait).
    await clock.advance(299)
    refusal = await raw_tls_attempt(url, pki.raw_context, hello_with(TOKEN))
    assert refusal is not None
    assert refusal[0] == "locked_out"
    await clock.advance(2)
    # Kept: greeted, and a PING answered (the connection ends with the attempt, so the peer
    # is gone before accepted() could hand it out).
    assert await raw_tls_attempt(url, pki.raw_context, hello_with(TOKEN)) is None


async def test_failures_spread_beyond_the_window_do_not_lock(
    pki: Pki, locked_server: tuple[Endpoint, ManualClock, str]
) -> None:
    _, clock, url = locked_server
    for attempt in range(5):
        refusal = await raw_tls_attempt(url, pki.raw_context, hello_with(f"guess {attempt}"))
        assert refusal is not None
        assert refusal[0] == "unauthorized"
        assert "locked out" not in refusal[1]
        await clock.advance(31)  # two failures per 60 s window: under the limit of 3
    assert await raw_tls_attempt(url, pki.raw_context, hello_with(TOKEN)) is None


async def _poll(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Wait until `condition()` holds (checked each loop turn of a few ms), failing after
    `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_half_open_tls_handshakes_hold_slots_until_hello_timeout(pki: Pki) -> None:
    """Raw sockets that connect to a tcps:// listener and never start TLS count against
    max_connections while they last; hello_timeout closes them and releases their fds."""
    process = psutil.Process()
    async with Endpoint(tls=pki.server, max_connections=4, hello_timeout=0.5) as server:
        url = await server.listen("tcps://127.0.0.1:0")
        host, port = url.removeprefix("tcps://").rsplit(":", 1)
        fds_before = process.num_fds()
        loop = asyncio.get_running_loop()
        half_open = []
        for _ in range(4):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, int(port)))
            half_open.append(sock)
        await _poll(lambda: server._handshakes.pending == 4, "4 pending handshakes")
        # Every slot is held: an honest client is refused at once, told why.
        async with Endpoint(tls=pki.client) as honest:
            with pytest.raises(TensorwireError, match="limit of 4 connections"):
                await honest.connect(url)
        # hello_timeout (0.5 s) cuts the handshakes: each raw socket sees the server hang up.
        for sock in half_open:
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(loop.sock_recv(sock, 1), 10) == b""
            sock.close()
        await _poll(lambda: server._handshakes.pending == 0, "the handshakes released")
        await _poll(lambda: process.num_fds() <= fds_before, "the server's fds closed")
        # The slots are free again.
        async with Endpoint(tls=pki.client) as honest:
            await honest.connect(url)


@pytest.fixture
async def rate_server() -> AsyncIterator[tuple[Endpoint, ManualClock, str]]:
    clock = ManualClock()
    async with Endpoint(
        clock=clock, min_frame_rate=1024.0, frame_grace=10.0, hello_timeout=5.0
    ) as server:
        yield server, clock, await server.listen("tcp://127.0.0.1:0")


async def _raw_after_hello(url: str) -> tuple[RawReceiver, Any]:
    receiver = RawReceiver()
    connection = await driver_for(url).connect(url, receiver)
    await connection.send([hello_with(None)])
    await asyncio.wait_for(receiver.greeted.wait(), 10)
    return receiver, connection


async def test_a_frame_trickled_below_the_minimum_rate_is_dropped(
    rate_server: tuple[Endpoint, ManualClock, str],
) -> None:
    """Slow loris inside a frame: a PING's bytes one every 5 s (of the endpoint's clock)."""
    server, clock, url = rate_server
    receiver, connection = await _raw_after_hello(url)
    frame = raw(FrameType.PING, offset=3)
    links = [link for link in server._links if link.remote_node == "attacker"]
    sent = 0
    for byte in range(len(frame) - 1):
        if links[0].error is not None:
            break  # dropped: what it would still send goes nowhere
        received = links[0].bytes_in
        await connection.send([frame[byte : byte + 1]])
        sent += 1
        await _poll(lambda seen=received: links[0].bytes_in > seen, "a byte")
        await clock.advance(5)
    await asyncio.wait_for(receiver.closed.wait(), 10)
    connection.abort()
    assert receiver.goaway_code() == "too_slow"
    assert sent == 2  # at 0 s and 5 s; dropped at 10 s (frame_grace), not at the frame's end


async def test_a_slow_frame_above_the_minimum_rate_is_kept(
    rate_server: tuple[Endpoint, ManualClock, str],
) -> None:
    """A frame sent at 2 KiB/s (over the 1 KiB/s minimum) for 30 s of clock time survives."""
    server, clock, url = rate_server
    receiver, connection = await _raw_after_hello(url)
    link = next(link for link in server._links if link.remote_node == "attacker")
    frame = raw(FrameType.REQUEST, stream_id=1, header={}, payload=b"x" * 60_000)
    pieces = [frame[i : i + 2048] for i in range(0, len(frame), 2048)]
    for piece in pieces[:-1]:
        received = link.bytes_in
        await connection.send([piece])
        await _poll(lambda seen=received: link.bytes_in > seen, "a piece")
        await clock.advance(1)
    assert not receiver.closed.is_set()
    assert link.error is None
    connection.abort()
