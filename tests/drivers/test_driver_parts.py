"""Pieces of the drivers that the conformance suite does not reach: error mapping, options,
the memory registry, a failing receiver, socket buffer sizes."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from tests.drivers.receivers import RecordingReceiver
from transport.drivers import MemoryDriver, TcpDriver, TcpOptions, driver_for, known_schemes
from transport.drivers.base import DriverConnection, map_exceptions, parse_host_port_url
from transport.drivers.tcp import TcpConnection
from transport.exceptions import (
    ConfigError,
    ConnectError,
    ConnectionClosedError,
    StreamStateError,
    TensorwireError,
    TransportError,
)

ERRORS: dict[type[BaseException], type[TensorwireError]] = {
    ssl.SSLError: ConnectError,
    OSError: TransportError,
}


def test_map_exceptions_maps_native_errors_with_context() -> None:
    expected = r"^reading from x: ConnectionResetError: gone$"
    with (
        pytest.raises(TransportError, match=expected) as caught,
        map_exceptions(ERRORS, "reading from x"),
    ):
        raise ConnectionResetError("gone")
    assert isinstance(caught.value.__cause__, ConnectionResetError)

    with pytest.raises(ConnectError, match="SSLError"), map_exceptions(ERRORS, "tls"):
        raise ssl.SSLError("handshake")


@pytest.mark.parametrize("passing", [StreamStateError("ours"), KeyError("unmapped")])
def test_map_exceptions_lets_tensorwire_and_unmapped_errors_through(passing: Exception) -> None:
    with pytest.raises(type(passing)), map_exceptions(ERRORS, "ctx"):
        raise passing


async def test_map_exceptions_never_swallows_cancellation() -> None:
    with (
        pytest.raises(asyncio.CancelledError),
        map_exceptions({BaseException: TransportError}, "x"),
    ):
        raise asyncio.CancelledError


def test_parse_host_port_url_accepts_ipv6_and_names() -> None:
    assert parse_host_port_url("tcp://[::1]:80", ("tcp",), allow_port_zero=False) == (
        "tcp",
        "::1",
        80,
    )
    assert parse_host_port_url("tcps://example.org:0", ("tcps",), allow_port_zero=True).port == 0


def test_registry_knows_the_built_in_schemes() -> None:
    assert known_schemes() == ("grpc", "grpcs", "http", "https", "memory", "tcp", "tcps")
    assert isinstance(driver_for("tcps://h:1"), TcpDriver)
    assert isinstance(driver_for("memory://m"), MemoryDriver)


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"write_high_water": 0}, "write_high_water must be >= 1, got 0"),
        ({"write_high_water": 10, "write_low_water": 11}, r"in \[0, write_high_water=10\], got 11"),
        ({"send_buffer_size": -5}, "send_buffer_size must be >= 1 or None, got -5"),
    ],
)
def test_bad_tcp_options_are_config_errors_with_the_numbers(
    options: dict[str, int], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        TcpOptions(**options)


async def test_socket_options_reach_both_ends() -> None:
    options = TcpOptions(send_buffer_size=128 * 1024, recv_buffer_size=96 * 1024)
    driver = TcpDriver(options)
    accepted: list[DriverConnection] = []
    was_accepted = asyncio.Event()

    def accept(conn: DriverConnection) -> RecordingReceiver:
        accepted.append(conn)
        was_accepted.set()
        return RecordingReceiver()

    listener = await driver.listen("tcp://127.0.0.1:0", accept)
    client_receiver = RecordingReceiver()
    conn = await driver.connect(listener.url, client_receiver)
    await conn.send([b"x"])
    await asyncio.wait_for(was_accepted.wait(), 5)

    for end in (conn, accepted[0]):
        assert isinstance(end, TcpConnection)
        sock = end._transport.get_extra_info("socket")
        # Linux doubles the requested sizes for its bookkeeping.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 128 * 1024
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 96 * 1024
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    conn.abort()
    await listener.close()


async def test_memory_name_in_use_and_anonymous_names() -> None:
    driver = MemoryDriver()
    first = await driver.listen("memory://taken", lambda c: RecordingReceiver())
    with pytest.raises(TransportError, match=r"cannot listen on memory://taken: .*in use"):
        await driver.listen("memory://taken", lambda c: RecordingReceiver())
    anonymous = await driver.listen("memory://", lambda c: RecordingReceiver())
    assert anonymous.url.startswith("memory://anonymous-")
    await first.close()
    await anonymous.close()
    again = await driver.listen("memory://taken", lambda c: RecordingReceiver())
    await again.close()


def test_memory_listeners_are_per_event_loop() -> None:
    async def listen() -> str:
        listener = await MemoryDriver().listen("memory://per-loop", lambda c: RecordingReceiver())
        return listener.url  # left open on purpose: the next loop must not see it

    assert asyncio.run(listen()) == asyncio.run(listen()) == "memory://per-loop"


async def test_memory_receiver_that_fails_aborts_both_sides(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Failing(RecordingReceiver):
        def buffer_updated(self, nbytes: int) -> None:
            raise RuntimeError("receiver bug")

    driver = MemoryDriver()
    server_receiver = Failing()
    listener = await driver.listen("memory://failing", lambda c: server_receiver)
    client_receiver = RecordingReceiver()
    conn = await driver.connect(listener.url, client_receiver)
    await conn.send([b"boom"])

    server_error = await asyncio.wait_for(server_receiver.lost, 5)
    assert isinstance(server_error, ConnectionClosedError)
    assert "receiver bug" in str(server_error)
    assert isinstance(await asyncio.wait_for(client_receiver.lost, 5), ConnectionClosedError)
    assert "receiver bug" in caplog.text
    await listener.close()


async def test_accept_callback_failure_is_a_connect_error_on_memory() -> None:
    def refuse(conn: DriverConnection) -> RecordingReceiver:
        raise ValueError("no thanks")

    listener = await MemoryDriver().listen("memory://refusing", refuse)
    with pytest.raises(ConnectError, match="accept callback failed: ValueError: no thanks"):
        await MemoryDriver().connect(listener.url, RecordingReceiver())
    await listener.close()


async def test_accept_callback_failure_drops_the_tcp_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(conn: DriverConnection) -> RecordingReceiver:
        raise ValueError("no thanks")

    listener = await TcpDriver().listen("tcp://127.0.0.1:0", refuse)
    receiver = RecordingReceiver()
    await TcpDriver().connect(listener.url, receiver)

    await asyncio.wait_for(receiver.lost, 5)
    assert "accept callback failed" in caplog.text
    await listener.close()
