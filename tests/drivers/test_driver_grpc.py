"""grpc:// and grpcs:// beyond the shared conformance and TLS suites (which run over grpc and
grpcs through conftest.py): grpc status codes, the connect timeout, foreign grpc servers, options,
and TLS settings grpc cannot honour."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.drivers.conftest import GRPC_KINDS, DriverUnderTest, MiB
from tests.drivers.receivers import RecordingReceiver
from transport.drivers.base import TLSConfig
from transport.drivers.grpc import GrpcDriver, GrpcOptions
from transport.exceptions import ConfigError, ConnectError, ConnectionClosedError


@pytest.mark.parametrize("under_test", GRPC_KINDS, indirect=True)
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


# --- connecting ---------------------------------------------------------------------------------


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


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_frame_size"):
        GrpcOptions(max_frame_size=1000)
    with pytest.raises(ConfigError, match="connect_timeout"):
        GrpcOptions(connect_timeout=0)
    with pytest.raises(ConfigError, match="max_message_size"):
        GrpcOptions(max_message_size=0)
    options = dict(GrpcOptions(stream_window=1 * MiB, max_message_size=2 * MiB).channel_options())
    assert options["grpc.max_send_message_length"] == 2 * MiB
    assert options["grpc.max_receive_message_length"] == 2 * MiB
    assert options["grpc.http2.lookahead_bytes"] == 1 * MiB


async def test_client_without_peer_verification_is_refused() -> None:
    with pytest.raises(ConfigError, match="verify_peer=False"):
        await GrpcDriver().connect(
            "grpcs://127.0.0.1:1", RecordingReceiver(), tls=TLSConfig(verify_peer=False)
        )
