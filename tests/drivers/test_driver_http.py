"""http:// and https:// beyond the shared conformance and TLS suites (which run over http and
https through conftest.py): close_linger against a foreign client, HTTP-level refusals, foreign and
silent web servers, faults during connect, and options."""

from __future__ import annotations

import asyncio
import contextlib
from unittest import mock

import aiohttp
import pytest

from tests.drivers.conftest import HTTP_KINDS, Certs, DriverUnderTest, make_driver_under_test
from tests.drivers.receivers import RecordingReceiver
from transport.drivers.http import CONNECT_PATH, HttpDriver, HttpOptions
from transport.exceptions import ConfigError, ConnectError


async def test_close_aborts_after_linger_when_the_peer_never_ends() -> None:
    """A foreign client on a raw socket that keeps its request body open: close() gives up."""
    harness = DriverUnderTest(
        "http", HttpDriver(HttpOptions(close_linger=0.3)), "http://127.0.0.1:0", None, None
    )
    listener = await harness.listen()
    host, port = listener.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {CONNECT_PATH} HTTP/1.1\r\nHost: {host}\r\nTensorwire-Driver: http/1\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode()
    )
    await (await harness.accepted_receiver()).wait_for_bytes(5)
    server = harness.accepted[0][0]
    loop = asyncio.get_running_loop()
    started = loop.time()

    await asyncio.wait_for(server.close(), 5)

    assert 0.25 < loop.time() - started < 3
    assert server.closed
    with contextlib.suppress(ConnectionResetError):  # the abort may reach it as a reset
        await asyncio.wait_for(reader.read(), 5)  # returns: the server dropped the connection
    writer.close()
    await harness.aclose()


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", CONNECT_PATH, {}, 400),  # no Tensorwire-Driver header
        ("POST", CONNECT_PATH, {"Tensorwire-Driver": "http/1", "Content-Encoding": "gzip"}, 400),
        ("GET", CONNECT_PATH, {"Tensorwire-Driver": "http/1"}, 405),
        ("POST", "/elsewhere", {"Tensorwire-Driver": "http/1"}, 404),
    ],
)
async def test_server_answers_stray_http_requests_with_errors(
    certs: Certs, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    harness = make_driver_under_test("http", certs, small_buffers=False)
    listener = await harness.listen()
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, listener.url + path, headers=headers) as response,
    ):
        assert response.status == status
    assert not harness.accepted
    await harness.aclose()


async def test_connecting_to_a_plain_web_server_is_a_connect_error() -> None:
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_post(CONNECT_PATH, hello)
    # lingering_time=0: at cleanup the foreign server does not wait (10 s by default, on the
    # stdlib loop) for the rest of a request body the refused driver never finished.
    runner = web.AppRunner(app, lingering_time=0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        with pytest.raises(ConnectError, match=rf"cannot connect to {url}: .*HTTP 200"):
            await HttpDriver().connect(url, RecordingReceiver())
    finally:
        await runner.cleanup()


async def test_server_that_never_answers_is_a_connect_error_after_the_timeout() -> None:
    silent = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    driver = HttpDriver(HttpOptions(connect_timeout=0.3))
    try:
        with pytest.raises(ConnectError, match=f"cannot connect to {url}: TimeoutError"):
            await asyncio.wait_for(driver.connect(url, RecordingReceiver()), 5)
    finally:
        silent.close()


@pytest.mark.parametrize("under_test", HTTP_KINDS, indirect=True)
async def test_server_disconnect_during_connect_is_a_connect_error(
    under_test: DriverUnderTest,
) -> None:
    listener = await under_test.listen()
    fault = aiohttp.ServerDisconnectedError()
    with (
        mock.patch.object(aiohttp.ClientSession, "post", side_effect=fault),
        pytest.raises(ConnectError, match=f"cannot connect to {listener.url}: Server"),
    ):
        await under_test.connect(listener.url, RecordingReceiver())


@pytest.mark.parametrize(
    "settings",
    [
        {"write_high_water": 0},
        {"read_buffer_size": 0},
        {"connect_timeout": 0},
        {"close_linger": -1},
    ],
)
def test_bad_options_are_config_errors(settings: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(settings))):
        HttpOptions(**settings)  # type: ignore[arg-type]
