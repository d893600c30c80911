"""The promises of the driver contract, checked on memory, tcp and tcps alike."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest
import safetensors.torch
import torch

from tests.drivers.conftest import DriverUnderTest, KiB, MiB
from tests.drivers.receivers import EchoReceiver, RecordingReceiver
from transport.drivers import driver_for
from transport.drivers.base import Buffer, DriverConnection
from transport.exceptions import ConfigError, ConnectError, ConnectionClosedError

# How long a send() must stay blocked to count as blocked: long enough for any buffer to drain.
BLOCKED_FOR_S = 0.5
PATTERN = random.Random(0).randbytes(256 * KiB)


def safetensors_blob(megabytes: int, seed: int) -> bytes:
    """A real safetensors blob of random float32 tensors, about `megabytes` MiB."""
    generator = torch.Generator().manual_seed(seed)
    floats_per_tensor = megabytes * MiB // 4 // 3
    tensors = {
        f"layer{i}.weight": torch.randn(floats_per_tensor, generator=generator) for i in (0, 1, 2)
    }
    return safetensors.torch.save(tensors)


def random_parts(blob: bytes, rng: random.Random) -> list[Buffer]:
    """Split `blob` at random points into memoryview slices, bytes and bytearrays."""
    view = memoryview(blob)
    parts: list[Buffer] = []
    offset = 0
    while offset < len(blob):
        size = min(rng.choice((1, 7, 4 * KiB, 64 * KiB, 300 * KiB, 1 * MiB)), len(blob) - offset)
        piece = view[offset : offset + size]
        parts.append(rng.choice((piece, bytes(piece), bytearray(piece))) if size < KiB else piece)
        offset += size
    return parts


async def send_in_random_batches(conn: DriverConnection, parts: list[Buffer], seed: int) -> None:
    rng = random.Random(seed)
    index = 0
    while index < len(parts):
        batch = rng.randint(1, 8)
        await conn.send(parts[index : index + batch])
        index += batch


async def test_echo_of_random_splits_arrives_intact_and_in_order(
    under_test: DriverUnderTest,
) -> None:
    listener = await under_test.listen(EchoReceiver)
    blob = safetensors_blob(3, seed=1)
    received = RecordingReceiver()
    conn = await under_test.connect(listener.url, received)

    await send_in_random_batches(conn, random_parts(blob, random.Random(2)), seed=3)
    await received.wait_for_bytes(len(blob))

    assert bytes(received.data) == blob
    decoded = safetensors.torch.load(bytes(received.data))
    assert torch.equal(decoded["layer2.weight"], safetensors.torch.load(blob)["layer2.weight"])
    await conn.close()


async def test_many_concurrent_connections_keep_their_bytes_apart(
    under_test: DriverUnderTest,
) -> None:
    listener = await under_test.listen(EchoReceiver)

    async def round_trip(number: int) -> None:
        payload = random.Random(number).randbytes(64 * KiB + number)
        received = RecordingReceiver()
        conn = await under_test.connect(listener.url, received)
        await conn.send([payload[:1000], memoryview(payload)[1000:]])
        await received.wait_for_bytes(len(payload))
        assert bytes(received.data) == payload
        await conn.close()

    await asyncio.gather(*(round_trip(number) for number in range(24)))
    assert len(under_test.accepted) == 24


async def test_accept_runs_before_any_byte_is_delivered(under_test: DriverUnderTest) -> None:
    seen_before_data: list[bool] = []

    def make_receiver(conn: DriverConnection) -> RecordingReceiver:
        receiver = RecordingReceiver()
        seen_before_data.append(not receiver.data)
        return receiver

    listener = await under_test.listen(make_receiver)
    conn = await under_test.connect(listener.url, RecordingReceiver())
    await conn.send([b"first bytes"])
    server_receiver = await under_test.accepted_receiver()
    await server_receiver.wait_for_bytes(11)
    assert seen_before_data == [True]
    assert under_test.accepted[0][0].peer.scheme == under_test.kind


@pytest.mark.parametrize("closing_side", ["client", "server"])
async def test_peer_close_delivers_bytes_then_eof_then_connection_lost(
    under_test: DriverUnderTest, closing_side: str
) -> None:
    listener = await under_test.listen()
    client_receiver = RecordingReceiver()
    client = await under_test.connect(listener.url, client_receiver)
    await client.send([b"hello"])
    server_receiver = await under_test.accepted_receiver()
    await server_receiver.wait_for_bytes(5)
    server = under_test.accepted[0][0]
    closing, closing_receiver, other_receiver = (
        (client, client_receiver, server_receiver)
        if closing_side == "client"
        else (server, server_receiver, client_receiver)
    )

    await closing.send([b"last words"])
    await closing.close()
    await closing.close()  # idempotent

    assert closing.closed
    assert await asyncio.wait_for(closing_receiver.lost, 10) is None
    assert await asyncio.wait_for(other_receiver.lost, 10) is None
    assert other_receiver.data.endswith(b"last words")
    assert other_receiver.events[-2:] == ["eof", "lost"]
    with pytest.raises(ConnectionClosedError, match="closed"):
        await closing.send([b"more"])


async def start_blocked_sender(
    harness: DriverUnderTest,
) -> tuple[DriverConnection, asyncio.Task[int], RecordingReceiver]:
    """A client whose server paused reading on accept, and a task sending until it blocks."""

    def paused_receiver(conn: DriverConnection) -> RecordingReceiver:
        conn.pause_reading()
        return RecordingReceiver()

    listener = await harness.listen(paused_receiver)
    conn = await harness.connect(listener.url, RecordingReceiver())
    part = memoryview(PATTERN)  # one buffer, sent again and again

    async def send_16_mib() -> int:
        sent = 0
        for _ in range(64):
            await conn.send([b"header", part])
            sent += 6 + len(part)
        return sent

    sender = asyncio.get_running_loop().create_task(send_16_mib())
    done, _ = await asyncio.wait({sender}, timeout=BLOCKED_FOR_S)
    assert not done, "send() kept going although the receiver paused reading"
    return conn, sender, await harness.accepted_receiver()


async def test_paused_receiver_blocks_send_until_resumed(small_buffered: DriverUnderTest) -> None:
    _, sender, server_receiver = await start_blocked_sender(small_buffered)

    small_buffered.accepted[0][0].resume_reading()

    sent = await asyncio.wait_for(sender, 10)
    await server_receiver.wait_for_bytes(sent)
    assert sent == 64 * (6 + len(PATTERN))
    assert server_receiver.data == (b"header" + PATTERN) * 64


@pytest.mark.parametrize("aborting_side", ["sender", "receiver"])
async def test_abort_during_blocked_send_raises_connection_closed(
    small_buffered: DriverUnderTest, aborting_side: str
) -> None:
    conn, sender, server_receiver = await start_blocked_sender(small_buffered)
    server = small_buffered.accepted[0][0]

    (conn if aborting_side == "sender" else server).abort()

    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(sender, 10)
    server.resume_reading()  # a paused socket notices the peer's abort only when it reads again
    await asyncio.wait_for(server_receiver.lost, 10)
    assert server.closed
    await asyncio.wait_for(wait_closed(conn), 10)


async def wait_closed(conn: DriverConnection) -> None:
    """close() returns once the connection is gone, whoever closed it."""
    await conn.close()
    assert conn.closed


async def test_connect_to_nothing_raises_connect_error_naming_the_url(
    under_test: DriverUnderTest,
) -> None:
    if under_test.kind == "memory":
        url = "memory://nobody-listens-here"
    else:
        with socket.socket() as probe:  # a port that was free a moment ago: connection refused
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = f"{under_test.kind}://127.0.0.1:{port}"

    with pytest.raises(ConnectError, match=rf"cannot connect to {url}"):
        await under_test.connect(url, RecordingReceiver())


async def test_closed_listener_refuses_new_connections(under_test: DriverUnderTest) -> None:
    listener = await under_test.listen()
    await listener.close()
    await listener.close()  # idempotent

    with pytest.raises(ConnectError, match="cannot connect to"):
        await under_test.connect(listener.url, RecordingReceiver())


async def test_listener_reports_its_real_url(under_test: DriverUnderTest) -> None:
    listener = await under_test.listen()

    assert listener.url.startswith(f"{under_test.kind}://")
    assert not listener.url.endswith(":0")
    assert driver_for(listener.url) is not None


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        (
            "ftp://example.org:21",
            "unknown scheme 'ftp'; known schemes: grpc, grpcs, http, https, memory, tcp, tcps",
        ),
        ("localhost:7000", "no scheme; known schemes: grpc, grpcs, http, https, memory, tcp, tcps"),
    ],
)
def test_unknown_scheme_is_a_config_error_listing_known_schemes(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        driver_for(url)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("tcp://127.0.0.1", "no port"),
        ("tcp://:7000", "no host"),
        ("tcp://127.0.0.1:70000", "out of range"),
        ("tcp://127.0.0.1:0", "port 0 is only valid for listening"),
        ("tcp://127.0.0.1:7000/path", "only tcp://host:port"),
        ("tcps://127.0.0.1:x", "bad URL"),
        ("memory://", "the name must be"),
        ("memory://bad name", "the name must be"),
    ],
)
async def test_bad_connect_url_is_a_config_error_naming_it(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        await driver_for(url).connect(url, RecordingReceiver())
    assert url in str(caught.value)
