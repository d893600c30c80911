"""Socket tuning the WAN benchmark relies on: TcpOptions.congestion_control on real sockets."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

from tests.drivers.receivers import RecordingReceiver
from transport.drivers.tcp import TcpDriver, TcpOptions
from transport.exceptions import ConfigError, ConnectError, TransportError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="TCP_CONGESTION is Linux's")

_AVAILABLE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")


def _available() -> list[str]:
    return _AVAILABLE.read_text().split() if _AVAILABLE.exists() else []


def _congestion_control(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()


@pytest.mark.parametrize("name", ["", "has space", "x" * 16, "bbr\n"])
def test_a_name_the_kernel_cannot_have_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="congestion_control"):
        TcpOptions(congestion_control=name)


def test_options_that_must_precede_connect_make_the_driver_open_the_socket() -> None:
    assert not TcpOptions().opens_own_socket
    assert TcpOptions(congestion_control="reno").opens_own_socket
    assert TcpOptions(send_buffer_size=1 << 20).opens_own_socket


@pytest.mark.parametrize("name", ["reno", "bbr", "cubic"])
def test_the_socket_gets_the_congestion_control(name: str) -> None:
    if name not in _available():
        pytest.skip(f"this kernel does not offer {name}")
    with socket.socket() as sock:
        try:
            TcpOptions(congestion_control=name).apply_to_socket(sock)
        except OSError as exc:  # not in tcp_allowed_congestion_control and not root
            pytest.skip(str(exc))
        assert _congestion_control(sock) == name
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_connect_and_listen_name_an_unknown_algorithm() -> None:
    driver = TcpDriver(TcpOptions(congestion_control="nosuchcc"))
    with pytest.raises(TransportError, match="nosuchcc"):
        await driver.listen("tcp://127.0.0.1:0", lambda conn: RecordingReceiver())
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectError, match="nosuchcc"):
            await driver.connect(f"tcp://127.0.0.1:{port}", RecordingReceiver())
    finally:
        server.close()


async def test_both_ends_of_a_connection_use_it() -> None:
    if "reno" not in _available():
        pytest.skip("this kernel does not offer reno")
    driver = TcpDriver(TcpOptions(congestion_control="reno"))
    accepted: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    def accept(conn: object) -> RecordingReceiver:
        accepted.set_result(conn)
        return RecordingReceiver()

    listener = await driver.listen("tcp://127.0.0.1:0", accept)
    client = await driver.connect(listener.url, RecordingReceiver())
    server_side = await asyncio.wait_for(accepted, 10)
    try:
        for conn in (client, server_side):
            # The transport's socket: the option is only visible there.
            sock = conn._transport.get_extra_info("socket")  # type: ignore[attr-defined]
            assert _congestion_control(sock) == "reno"
    finally:
        await client.close()
        await listener.close()
