"""The promises of the driver contract, checked on every driver kind alike (memory, tcp, tcps,
grpc, grpcs, http, https; see DRIVER_KINDS in conftest.py). Where a driver legitimately adds to a
promise (grpc names the grpc status, socket drivers name 127.0.0.1), the test says so by kind."""

from __future__ import annotations

import asyncio
import random
import re
import socket

import pytest
import safetensors.torch
import torch
import uvloop

from tests.drivers.conftest import GRPC_KINDS, DriverUnderTest, KiB, MiB
from tests.drivers.receivers import EchoReceiver, RecordingReceiver
from transport.drivers import driver_for
from transport.drivers.base import Buffer, DriverConnection
from transport.exceptions import (
    ConfigError,
    ConnectError,
    ConnectionClosedError,
    TransportError,
)

# A sender counts as blocked once it made no progress for this long (and is not done): ample for
# a tiny buffer to drain into the peer's, and for 16 MiB to go if send() did not block at all.
STALLED_FOR_S = 0.1
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


async def test_both_directions_at_once_arrive_intact(under_test: DriverUnderTest) -> None:
    listener = await under_test.listen()
    to_server, to_client = safetensors_blob(3, seed=5), random.Random(6).randbytes(3 * MiB + 11)
    client_receiver = RecordingReceiver()
    client = await under_test.connect(listener.url, client_receiver)
    server_receiver = await under_test.accepted_receiver()
    server = under_test.accepted[0][0]

    await asyncio.gather(
        send_in_random_batches(client, random_parts(to_server, random.Random(7)), seed=8),
        send_in_random_batches(server, random_parts(to_client, random.Random(9)), seed=10),
    )
    await server_receiver.wait_for_bytes(len(to_server))
    await client_receiver.wait_for_bytes(len(to_client))

    assert server_receiver.data == to_server
    assert client_receiver.data == to_client
    assert server.peer.scheme == client.peer.scheme == under_test.kind


async def test_message_larger_than_the_receivers_buffer_is_delivered_in_pieces(
    under_test: DriverUnderTest,
) -> None:
    listener = await under_test.listen(lambda _conn: RecordingReceiver(buffer_size=1000))
    conn = await under_test.connect(listener.url, RecordingReceiver())
    message = random.Random(5).randbytes(5 * MiB + 3)  # for grpc: one message > the 4 MB cap

    await conn.send([message])
    server_receiver = await under_test.accepted_receiver()
    await server_receiver.wait_for_bytes(len(message))

    assert server_receiver.data == message


async def test_typed_memoryviews_travel_as_their_bytes(under_test: DriverUnderTest) -> None:
    listener = await under_test.listen(EchoReceiver)
    floats = torch.arange(1000, dtype=torch.float32)
    received = RecordingReceiver()
    conn = await under_test.connect(listener.url, received)

    await conn.send([memoryview(floats.numpy()), b"", bytearray(b"end")])  # format "f", 4000 B
    await received.wait_for_bytes(4003)

    assert bytes(received.data) == floats.numpy().tobytes() + b"end"


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
    if under_test.kind != "memory":  # memory has no address to report
        assert under_test.accepted[0][0].peer.address.startswith("127.0.0.1:")


async def test_accept_callback_failure_drops_only_that_connection(
    under_test: DriverUnderTest,
) -> None:
    calls = 0

    def flaky_accept(conn: DriverConnection) -> RecordingReceiver:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("not now")
        return EchoReceiver(conn)

    listener = await under_test.listen(flaky_accept)
    first = RecordingReceiver()
    try:
        conn = await under_test.connect(listener.url, first)
    except ConnectError:
        pass  # refused before the connection was up: fine too
    else:
        await asyncio.wait_for(first.lost, 10)
        assert conn.closed
    await assert_echoes(under_test, listener.url)


async def assert_echoes(harness: DriverUnderTest, url: str) -> None:
    """A fresh connection to the echo listener at `url` gets its bytes back."""
    receiver = RecordingReceiver()
    conn = await harness.connect(url, receiver)
    await conn.send([b"ping"])
    await receiver.wait_for_bytes(4)
    assert receiver.data == b"ping"
    await conn.close()


async def test_failing_receiver_aborts_the_connection(under_test: DriverUnderTest) -> None:
    class FailingReceiver(RecordingReceiver):
        def buffer_updated(self, nbytes: int) -> None:
            raise RuntimeError("sink is broken")

    listener = await under_test.listen(lambda conn: FailingReceiver())
    client_receiver = RecordingReceiver()
    client = await under_test.connect(listener.url, client_receiver)
    await client.send([b"boom"])

    server_lost = await asyncio.wait_for((await under_test.accepted_receiver()).lost, 10)
    assert isinstance(server_lost, ConnectionClosedError)
    assert "sink is broken" in str(server_lost)
    await asyncio.wait_for(client_receiver.lost, 10)
    assert client.closed


# --- closing ------------------------------------------------------------------------------------


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

    await closing.send([b"last words", PATTERN])
    await asyncio.wait_for(closing.close(), 10)
    await closing.close()  # idempotent

    assert closing.closed
    assert await asyncio.wait_for(closing_receiver.lost, 10) is None
    assert await asyncio.wait_for(other_receiver.lost, 10) is None
    assert other_receiver.data.endswith(b"last words" + PATTERN)
    assert other_receiver.events[-2:] == ["eof", "lost"]
    with pytest.raises(ConnectionClosedError, match="closed"):
        await closing.send([b"more"])


async def test_close_with_a_paused_receiver_still_completes(under_test: DriverUnderTest) -> None:
    listener = await under_test.listen()
    client_receiver = RecordingReceiver()
    client = await under_test.connect(listener.url, client_receiver)
    await client.send([b"x"])
    await (await under_test.accepted_receiver()).wait_for_bytes(1)
    server = under_test.accepted[0][0]
    client.pause_reading()
    await server.send([b"unread"])

    loop = asyncio.get_running_loop()
    await asyncio.wait_for(client.close(), 10)

    assert client.closed
    assert server.closed
    lost = await asyncio.wait_for(client_receiver.lost, 10)
    if lost is not None and under_test.kind == "tcps" and not isinstance(loop, uvloop.Loop):
        pytest.xfail(f"stdlib asyncio's SSL layer reports the unread data as an error: {lost}")
    assert lost is None


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
    sends = 0

    async def send_16_mib() -> int:
        nonlocal sends
        for _ in range(64):
            await conn.send([b"header", part])
            sends += 1
        return sends * (6 + len(part))

    sender = asyncio.get_running_loop().create_task(send_16_mib())
    async with asyncio.timeout(10):  # wait for the sends to stop moving, not a fixed time
        while True:
            before = sends
            done, _ = await asyncio.wait({sender}, timeout=STALLED_FOR_S)
            assert not done, "send() kept going although the receiver paused reading"
            if sends == before:
                break
    return conn, sender, await harness.accepted_receiver()


async def test_paused_receiver_blocks_send_until_resumed(small_buffered: DriverUnderTest) -> None:
    _, sender, server_receiver = await start_blocked_sender(small_buffered)
    assert len(server_receiver.data) == 0

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
    if small_buffered.kind not in GRPC_KINDS:
        # A paused socket notices the peer's abort only when it reads again; grpc sees the
        # cancelled call without reading (and, resumed, reports it as an orderly end instead).
        server.resume_reading()
    lost = await asyncio.wait_for(server_receiver.lost, 10)
    if small_buffered.kind in GRPC_KINDS and aborting_side == "sender":
        # grpc sees the client's abort as a cancelled call, and says so.
        assert isinstance(lost, ConnectionClosedError)
        assert "cancelled" in str(lost)
    assert server.closed
    await asyncio.wait_for(wait_closed(conn), 10)


async def wait_closed(conn: DriverConnection) -> None:
    """close() returns once the connection is gone, whoever closed it."""
    await conn.close()
    assert conn.closed


# --- connecting and listening -------------------------------------------------------------------


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
    # grpc adds the status it got from the channel.
    detail = ": grpc status UNAVAILABLE" if under_test.kind in GRPC_KINDS else ""

    with pytest.raises(ConnectError, match=rf"cannot connect to {url}{detail}"):
        await asyncio.wait_for(under_test.connect(url, RecordingReceiver()), 10)


async def test_closed_listener_refuses_new_connections_but_keeps_open_ones(
    under_test: DriverUnderTest,
) -> None:
    listener = await under_test.listen(EchoReceiver)
    received = RecordingReceiver()
    conn = await under_test.connect(listener.url, received)

    await listener.close()
    await listener.close()  # idempotent

    with pytest.raises(ConnectError, match=f"cannot connect to {re.escape(listener.url)}"):
        await under_test.connect(listener.url, RecordingReceiver())
    await conn.send([b"still here"])
    await received.wait_for_bytes(10)
    assert received.data == b"still here"


async def test_listener_reports_its_real_url(under_test: DriverUnderTest) -> None:
    listener = await under_test.listen()

    assert listener.url.startswith(f"{under_test.kind}://")
    if under_test.kind != "memory":
        assert listener.url.startswith(f"{under_test.kind}://127.0.0.1:")
    assert not listener.url.endswith(":0")
    assert driver_for(listener.url) is not None


async def test_listening_on_a_used_address_is_an_error_naming_the_url(
    under_test: DriverUnderTest,
) -> None:
    listener = await under_test.listen()
    # grpc reports only that it could not bind; the others say why.
    why = "" if under_test.kind in GRPC_KINDS else ": .*in use"

    with pytest.raises(TransportError, match=f"cannot listen on {re.escape(listener.url)}{why}"):
        await under_test.driver.listen(
            listener.url, lambda _conn: RecordingReceiver(), tls=under_test.server_tls
        )


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
        ("grpc://127.0.0.1", "no port"),
        ("grpc://:7000", "no host"),
        ("grpc://127.0.0.1:70000", "out of range"),
        ("grpc://127.0.0.1:0", "port 0 is only valid for listening"),
        ("grpc://127.0.0.1:7000/tensorwire.Transport/Frames", "only grpc://host:port"),
        ("grpcs://127.0.0.1:x", "bad URL"),
        ("http://127.0.0.1", "no port"),
        ("https://:7000", "no host"),
        ("http://127.0.0.1:70000", "out of range"),
        ("http://127.0.0.1:0", "port 0 is only valid for listening"),
        ("http://127.0.0.1:7000/tensorwire/v1/connect", "only http://host:port"),
        ("http://127.0.0.1:7000?x=1", "only http://host:port"),
    ],
)
async def test_bad_connect_url_is_a_config_error_naming_it(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        await driver_for(url).connect(url, RecordingReceiver())
    assert url in str(caught.value)


@pytest.mark.parametrize(
    ("scheme", "complaint"),
    [("grpc", "scheme must be one of grpc, grpcs"), ("http", "scheme must be one of http, https")],
)
async def test_driver_given_another_drivers_url_is_a_config_error(
    scheme: str, complaint: str
) -> None:
    url = "tcp://127.0.0.1:7000"
    with pytest.raises(ConfigError, match=complaint) as caught:
        await driver_for(f"{scheme}://127.0.0.1:1").connect(url, RecordingReceiver())
    assert url in str(caught.value)


# --- through the public API ---------------------------------------------------------------------


async def test_endpoint_sends_a_state_dict_bit_exact(under_test: DriverUnderTest) -> None:
    from transport import Endpoint, StateDictSink

    generator = torch.Generator().manual_seed(11)
    state = {
        "embed.weight": torch.randn(512, 1024, generator=generator),  # 2 MiB
        "layer.0.weight": torch.randn(256, 1024, generator=generator).to(torch.bfloat16),
        "layer.0.bias": torch.randint(-100, 100, (1000,), dtype=torch.int64, generator=generator),
        "layer.1.weight": torch.randint(0, 1000, (300, 1001), generator=generator),
        "layer.1.bias": torch.randn(1000, generator=generator).to(torch.bfloat16),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }
    settings = {"chunk_size": 1 << 20, "stream_window": 2 << 20}
    async with Endpoint(tls=under_test.server_tls, **settings) as server:
        url = await server.listen(under_test.listen_url)
        async with Endpoint(tls=under_test.client_tls, **settings) as client:
            peer = await client.connect(url)

            async def receive() -> dict[str, torch.Tensor]:
                transfer = await anext(server.incoming())
                return await transfer.receive_into(StateDictSink())  # type: ignore[no-any-return]

            receiving = asyncio.ensure_future(receive())
            await asyncio.wait_for(peer.send_state_dict(state), 30)
            received = await asyncio.wait_for(receiving, 30)

    assert received.keys() == state.keys()
    for name, tensor in state.items():
        assert received[name].dtype == tensor.dtype, name
        assert torch.equal(received[name], tensor), name
