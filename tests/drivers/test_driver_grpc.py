"""grpc:// and grpcs://: the driver contract over real grpc.aio servers on 127.0.0.1, mutual TLS
with the throwaway CA, and a state dict end to end through the public API."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator

import pytest
import torch

from tests.drivers.conftest import Certs, DriverUnderTest, KiB, MiB
from tests.drivers.receivers import EchoReceiver, RecordingReceiver
from tests.drivers.test_driver_conformance import (
    PATTERN,
    random_parts,
    safetensors_blob,
    send_in_random_batches,
    start_blocked_sender,
    wait_closed,
)
from transport.drivers.base import DriverConnection, Listener, TLSConfig
from transport.drivers.grpc import GrpcDriver, GrpcOptions
from transport.exceptions import ConfigError, ConnectError, ConnectionClosedError, TransportError

# Tiny HTTP/2 windows and no BDP probing, so back-pressure shows after a few hundred KiB.
SMALL_WINDOWS = GrpcOptions(stream_window=64 * KiB, bdp_probe=False, connect_timeout=5.0)


def grpc_under_test(kind: str, certs: Certs, options: GrpcOptions | None = None) -> DriverUnderTest:
    driver = GrpcDriver(options or GrpcOptions(connect_timeout=5.0))
    if kind == "grpc":
        return DriverUnderTest(kind, driver, "grpc://127.0.0.1:0", None, None)
    return DriverUnderTest(
        kind, driver, "grpcs://127.0.0.1:0", certs.server_tls(), certs.client_tls()
    )


@pytest.fixture(params=["grpc", "grpcs"])
async def under_test(
    request: pytest.FixtureRequest, certs: Certs
) -> AsyncIterator[DriverUnderTest]:
    harness = grpc_under_test(request.param, certs)
    yield harness
    await harness.aclose()


@pytest.fixture
async def small_windows(certs: Certs) -> AsyncIterator[DriverUnderTest]:
    harness = grpc_under_test("grpc", certs, SMALL_WINDOWS)
    yield harness
    await harness.aclose()


# --- bytes --------------------------------------------------------------------------------------


async def test_random_splits_arrive_intact_and_in_order(under_test: DriverUnderTest) -> None:
    listener = await under_test.listen(EchoReceiver)
    blob = safetensors_blob(3, seed=1)
    received = RecordingReceiver()
    conn = await under_test.connect(listener.url, received)

    await send_in_random_batches(conn, random_parts(blob, random.Random(2)), seed=3)
    await received.wait_for_bytes(len(blob))

    assert bytes(received.data) == blob
    await conn.close()


async def test_message_larger_than_the_receivers_buffer_is_delivered_in_pieces(
    under_test: DriverUnderTest,
) -> None:
    listener = await under_test.listen(lambda _conn: RecordingReceiver(buffer_size=1000))
    conn = await under_test.connect(listener.url, RecordingReceiver())
    message = random.Random(5).randbytes(5 * MiB + 3)  # one grpc message, > the 4 MB default cap

    await conn.send([message])
    server_receiver = await under_test.accepted_receiver()
    await server_receiver.wait_for_bytes(len(message))

    assert server_receiver.data == message


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

    await asyncio.gather(*(round_trip(number) for number in range(16)))
    assert len(under_test.accepted) == 16


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
    assert under_test.accepted[0][0].peer.address.startswith("127.0.0.1:")


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


async def test_paused_receiver_blocks_send_until_resumed(small_windows: DriverUnderTest) -> None:
    _, sender, server_receiver = await start_blocked_sender(small_windows)
    assert len(server_receiver.data) == 0

    small_windows.accepted[0][0].resume_reading()

    sent = await asyncio.wait_for(sender, 10)
    await server_receiver.wait_for_bytes(sent)
    assert server_receiver.data == (b"header" + PATTERN) * 64


@pytest.mark.parametrize("aborting_side", ["sender", "receiver"])
async def test_abort_during_blocked_send_raises_connection_closed(
    small_windows: DriverUnderTest, aborting_side: str
) -> None:
    conn, sender, server_receiver = await start_blocked_sender(small_windows)
    server = small_windows.accepted[0][0]

    (conn if aborting_side == "sender" else server).abort()

    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(sender, 10)
    lost = await asyncio.wait_for(server_receiver.lost, 10)
    if aborting_side == "sender":
        assert isinstance(lost, ConnectionClosedError)
        assert "cancelled" in str(lost)
    assert server.closed
    await asyncio.wait_for(wait_closed(conn), 10)


async def test_server_abort_reaches_the_client_with_the_grpc_status(
    under_test: DriverUnderTest,
) -> None:
    listener = await under_test.listen()
    client_receiver = RecordingReceiver()
    client = await under_test.connect(listener.url, client_receiver)
    await client.send([b"x"])
    await under_test.accepted_receiver()

    under_test.accepted[0][0].abort()

    lost = await asyncio.wait_for(client_receiver.lost, 10)
    assert isinstance(lost, ConnectionClosedError)
    assert "ABORTED" in str(lost)
    assert listener.url in str(lost)


async def test_closed_listener_refuses_new_connections_but_keeps_open_ones(
    under_test: DriverUnderTest,
) -> None:
    listener = await under_test.listen(EchoReceiver)
    received = RecordingReceiver()
    conn = await under_test.connect(listener.url, received)

    await listener.close()
    await listener.close()  # idempotent

    with pytest.raises(ConnectError, match=f"cannot connect to {listener.url}"):
        await under_test.connect(listener.url, RecordingReceiver())
    await conn.send([b"still here"])
    await received.wait_for_bytes(10)
    assert received.data == b"still here"


# --- connecting ---------------------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("scheme", ["grpc", "grpcs"])
async def test_connect_to_nothing_raises_connect_error_naming_url_and_status(
    scheme: str, certs: Certs
) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}"
    tls = certs.client_tls() if scheme == "grpcs" else None

    with pytest.raises(ConnectError, match=rf"cannot connect to {url}: grpc status UNAVAILABLE"):
        await asyncio.wait_for(GrpcDriver().connect(url, RecordingReceiver(), tls=tls), 10)


async def test_connect_to_a_silent_server_times_out_as_connect_error() -> None:
    with socket.socket() as silent:  # the kernel completes handshakes; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"grpc://127.0.0.1:{silent.getsockname()[1]}"
        driver = GrpcDriver(GrpcOptions(connect_timeout=0.5))

        with pytest.raises(ConnectError, match=rf"cannot connect to {url}: no answer within"):
            await asyncio.wait_for(driver.connect(url, RecordingReceiver()), 10)


async def test_grpc_server_without_the_tensorwire_method_is_refused() -> None:
    import grpc.aio

    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    url = f"grpc://127.0.0.1:{port}"
    try:
        with pytest.raises(ConnectError, match=rf"{url}: grpc status UNIMPLEMENTED"):
            await asyncio.wait_for(GrpcDriver().connect(url, RecordingReceiver()), 10)
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("grpc://127.0.0.1", "no port"),
        ("grpc://:7000", "no host"),
        ("grpc://127.0.0.1:70000", "out of range"),
        ("grpc://127.0.0.1:0", "port 0 is only valid for listening"),
        ("grpc://127.0.0.1:7000/tensorwire.Transport/Frames", "only grpc://host:port"),
        ("grpcs://127.0.0.1:x", "bad URL"),
        ("tcp://127.0.0.1:7000", "scheme must be one of grpc, grpcs"),
    ],
)
async def test_bad_url_is_a_config_error_naming_it(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        await GrpcDriver().connect(url, RecordingReceiver())
    assert url in str(caught.value)


async def test_listening_on_a_used_port_is_an_error_naming_the_url(
    under_test: DriverUnderTest,
) -> None:
    listener = await under_test.listen()

    with pytest.raises(TransportError, match=f"cannot listen on {listener.url}"):
        await under_test.driver.listen(
            listener.url, lambda _conn: RecordingReceiver(), tls=under_test.server_tls
        )


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_frame_size"):
        GrpcOptions(max_frame_size=1000)
    with pytest.raises(ConfigError, match="connect_timeout"):
        GrpcOptions(connect_timeout=0)
    options = dict(GrpcOptions(stream_window=1 * MiB).channel_options())
    assert options["grpc.max_send_message_length"] == -1
    assert options["grpc.max_receive_message_length"] == -1
    assert options["grpc.http2.lookahead_bytes"] == 1 * MiB


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture
async def tls_server(certs: Certs) -> AsyncIterator[tuple[DriverUnderTest, Listener]]:
    """A grpcs echo listener that requires a client certificate from the test CA."""
    harness = grpc_under_test("grpcs", certs)
    listener = await harness.listen(EchoReceiver)
    yield harness, listener
    await harness.aclose()


async def assert_serves(harness: DriverUnderTest, url: str, tls: TLSConfig) -> None:
    receiver = RecordingReceiver()
    conn = await harness.connect(url, receiver, tls=tls)
    await conn.send([b"ping"])
    await receiver.wait_for_bytes(4)
    assert receiver.data == b"ping"
    await conn.close()


async def test_mutual_tls_reports_the_client_identity(
    tls_server: tuple[DriverUnderTest, Listener],
) -> None:
    harness, listener = tls_server
    conn = await harness.connect(listener.url, RecordingReceiver())
    await conn.send([b"x"])
    await harness.accepted_receiver()

    assert harness.accepted[0][0].peer.peer_identity == "site-1"
    assert harness.accepted[0][0].peer.scheme == "grpcs"
    assert conn.peer.peer_identity is None  # grpc python does not show the client the server cert


@pytest.mark.parametrize("client", ["no certificate", "certificate from another CA"])
async def test_server_refuses_bad_client_and_keeps_serving(
    tls_server: tuple[DriverUnderTest, Listener], certs: Certs, client: str
) -> None:
    harness, listener = tls_server
    bad_tls = TLSConfig(ca_file=certs.ca)
    if client == "certificate from another CA":
        bad_tls = TLSConfig(
            ca_file=certs.ca, cert_file=certs.foreign_client_cert, key_file=certs.foreign_client_key
        )

    with pytest.raises(ConnectError, match=f"cannot connect to {listener.url}"):
        await harness.connect(listener.url, RecordingReceiver(), tls=bad_tls)
    assert not harness.accepted
    await assert_serves(harness, listener.url, certs.client_tls())


async def test_client_refuses_server_it_cannot_verify(
    tls_server: tuple[DriverUnderTest, Listener], certs: Certs
) -> None:
    harness, listener = tls_server
    no_ca = TLSConfig(cert_file=certs.client_cert, key_file=certs.client_key)  # system CAs only

    with pytest.raises(ConnectError, match=f"cannot connect to {listener.url}"):
        await harness.connect(listener.url, RecordingReceiver(), tls=no_ca)
    await assert_serves(harness, listener.url, certs.client_tls())


async def test_server_hostname_overrides_the_checked_name(
    tls_server: tuple[DriverUnderTest, Listener], certs: Certs
) -> None:
    harness, listener = tls_server
    settings = {"ca_file": certs.ca, "cert_file": certs.client_cert, "key_file": certs.client_key}

    with pytest.raises(ConnectError, match="cannot connect to"):
        await harness.connect(
            listener.url,
            RecordingReceiver(),
            tls=TLSConfig(**settings, server_hostname="not-the-server.example"),
        )
    await assert_serves(harness, listener.url, TLSConfig(**settings, server_hostname="localhost"))


async def test_tls_scheme_and_settings_must_agree(certs: Certs) -> None:
    driver = GrpcDriver()
    accept = lambda _conn: RecordingReceiver()  # noqa: E731
    with pytest.raises(ConfigError, match="a grpcs:// listener needs a TLSConfig"):
        await driver.listen("grpcs://127.0.0.1:0", accept)
    with pytest.raises(ConfigError, match="TLS settings given for a plain grpc:// URL"):
        await driver.connect("grpc://127.0.0.1:1", RecordingReceiver(), tls=certs.client_tls())
    with pytest.raises(ConfigError, match=r"cannot load ca_file='/nonexistent/ca\.pem'"):
        await driver.connect(
            "grpcs://127.0.0.1:1", RecordingReceiver(), tls=TLSConfig(ca_file="/nonexistent/ca.pem")
        )
    with pytest.raises(ConfigError, match="verify_peer=False"):
        await driver.connect(
            "grpcs://127.0.0.1:1", RecordingReceiver(), tls=TLSConfig(verify_peer=False)
        )


# --- through the public API ---------------------------------------------------------------------


async def test_state_dict_round_trips_through_endpoints_over_grpc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import transport.drivers
    from transport import Endpoint, StateDictSink

    # Register on a copy of the registry, so later tests still see the built-in schemes only.
    monkeypatch.setattr(
        transport.drivers, "_drivers_by_scheme", dict(transport.drivers._drivers_by_scheme)
    )
    transport.drivers.register_driver(GrpcDriver())
    generator = torch.Generator().manual_seed(7)
    state = {
        "embed.weight": torch.randn(512, 1024, generator=generator),  # 2 MiB
        "layer.0.bias": torch.randn(1000, generator=generator).to(torch.bfloat16),
        "layer.0.weight": torch.randint(0, 1000, (300, 1001), generator=generator),
        "scalar": torch.tensor(3.5),
    }
    async with Endpoint(chunk_size=1 << 20, stream_window=2 << 20) as server:
        url = await server.listen("grpc://127.0.0.1:0")
        async with Endpoint(chunk_size=1 << 20, stream_window=2 << 20) as client:
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
