"""http:// and https:// on aiohttp: the driver conformance suite, mutual TLS, HTTP-level refusals,
and a state dict through the public Endpoint API.

The conformance tests are imported from test_driver_conformance and run here with this module's
`under_test` / `small_buffered` fixtures (http and https), until the http driver joins
DRIVER_KINDS in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from unittest import mock

import aiohttp
import pytest
import torch

import transport.drivers
from tests.drivers.conftest import Certs, DriverUnderTest, KiB, MiB
from tests.drivers.receivers import EchoReceiver, RecordingReceiver
from tests.drivers.test_driver_conformance import (  # noqa: F401 - collected and run here
    random_parts,
    safetensors_blob,
    send_in_random_batches,
    test_abort_during_blocked_send_raises_connection_closed,
    test_accept_runs_before_any_byte_is_delivered,
    test_closed_listener_refuses_new_connections,
    test_connect_to_nothing_raises_connect_error_naming_the_url,
    test_echo_of_random_splits_arrives_intact_and_in_order,
    test_many_concurrent_connections_keep_their_bytes_apart,
    test_paused_receiver_blocks_send_until_resumed,
    test_peer_close_delivers_bytes_then_eof_then_connection_lost,
)
from tests.drivers.test_driver_tls import assert_refused, assert_serves
from transport.drivers.base import DriverConnection, Listener, TLSConfig
from transport.drivers.http import CONNECT_PATH, HttpDriver, HttpOptions
from transport.exceptions import (
    ConfigError,
    ConnectError,
    ConnectionClosedError,
    TransportError,
)

HTTP_KINDS = ("http", "https")


def make_http_under_test(kind: str, certs: Certs, *, small_buffers: bool) -> DriverUnderTest:
    """`small_buffers`: tiny write high-water mark and read buffer, so back-pressure shows early
    (the kernel's socket buffers stay autotuned: aiohttp does not expose them)."""
    options = HttpOptions(write_high_water=256 * KiB, read_buffer_size=64 * KiB)
    driver = HttpDriver(options if small_buffers else None)
    if kind == "http":
        return DriverUnderTest(kind, driver, "http://127.0.0.1:0", None, None)
    return DriverUnderTest(
        kind, driver, "https://127.0.0.1:0", certs.server_tls(), certs.client_tls()
    )


async def _closed_harness(harness: DriverUnderTest) -> None:
    await harness.aclose()
    await asyncio.sleep(0.05)  # let client sessions finish closing before the loop goes


@pytest.fixture(params=HTTP_KINDS)
async def under_test(
    request: pytest.FixtureRequest, certs: Certs
) -> AsyncIterator[DriverUnderTest]:
    """http and https with default settings (overrides conftest's memory/tcp/tcps)."""
    harness = make_http_under_test(request.param, certs, small_buffers=False)
    yield harness
    await _closed_harness(harness)


@pytest.fixture(params=HTTP_KINDS)
async def small_buffered(
    request: pytest.FixtureRequest, certs: Certs
) -> AsyncIterator[DriverUnderTest]:
    """http and https with small buffers, for back-pressure tests."""
    harness = make_http_under_test(request.param, certs, small_buffers=True)
    yield harness
    await _closed_harness(harness)


# --- bytes both ways at once ----------------------------------------------------------------------


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


async def test_typed_memoryviews_travel_as_their_bytes(under_test: DriverUnderTest) -> None:
    listener = await under_test.listen(EchoReceiver)
    floats = torch.arange(1000, dtype=torch.float32)
    received = RecordingReceiver()
    conn = await under_test.connect(listener.url, received)

    await conn.send([memoryview(floats.numpy()), b"", bytearray(b"end")])  # format "f", 4000 B
    await received.wait_for_bytes(4003)

    assert bytes(received.data) == floats.numpy().tobytes() + b"end"


async def test_listener_reports_a_real_http_url(under_test: DriverUnderTest) -> None:
    listener = await under_test.listen()

    assert listener.url.startswith(f"{under_test.kind}://127.0.0.1:")
    assert not listener.url.endswith(":0")


# --- closing --------------------------------------------------------------------------------------


async def test_close_with_a_paused_receiver_still_completes(under_test: DriverUnderTest) -> None:
    listener = await under_test.listen()
    client_receiver = RecordingReceiver()
    client = await under_test.connect(listener.url, client_receiver)
    await client.send([b"x"])
    await (await under_test.accepted_receiver()).wait_for_bytes(1)
    server = under_test.accepted[0][0]
    client.pause_reading()
    await server.send([b"unread"])

    await asyncio.wait_for(client.close(), 10)

    assert client.closed
    assert server.closed
    assert await asyncio.wait_for(client_receiver.lost, 10) is None


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
    await _closed_harness(harness)


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


# --- mutual TLS -----------------------------------------------------------------------------------


@pytest.fixture
async def https_server(certs: Certs) -> AsyncIterator[tuple[DriverUnderTest, Listener]]:
    """An https echo listener that requires a client certificate from the test CA."""
    harness = make_http_under_test("https", certs, small_buffers=False)
    listener = await harness.listen(EchoReceiver)
    yield harness, listener
    await _closed_harness(harness)


async def test_mutual_tls_reports_both_identities(
    https_server: tuple[DriverUnderTest, Listener],
) -> None:
    harness, listener = https_server
    conn = await harness.connect(listener.url, RecordingReceiver())
    await conn.send([b"x"])
    await harness.accepted_receiver()

    assert conn.peer.peer_identity == "localhost"
    assert harness.accepted[0][0].peer.peer_identity == "site-1"
    assert harness.accepted[0][0].peer.scheme == "https"


@pytest.mark.parametrize("client", ["no certificate", "certificate from another CA"])
async def test_server_refuses_bad_client_and_keeps_serving(
    https_server: tuple[DriverUnderTest, Listener], certs: Certs, client: str
) -> None:
    harness, listener = https_server
    bad_tls = TLSConfig(ca_file=certs.ca)
    if client == "certificate from another CA":
        bad_tls = TLSConfig(
            ca_file=certs.ca, cert_file=certs.foreign_client_cert, key_file=certs.foreign_client_key
        )

    await assert_refused(harness, listener.url, bad_tls)
    await assert_serves(harness, listener.url, certs.client_tls())
    assert len(harness.accepted) == 1  # only the good client reached accept()


async def test_client_refuses_server_it_cannot_verify(
    https_server: tuple[DriverUnderTest, Listener], certs: Certs
) -> None:
    harness, listener = https_server
    no_ca = TLSConfig(cert_file=certs.client_cert, key_file=certs.client_key)  # system CAs only

    with pytest.raises(ConnectError, match=rf"cannot connect to {listener.url}.*(?i:certificate)"):
        await harness.connect(listener.url, RecordingReceiver(), tls=no_ca)
    await assert_serves(harness, listener.url, certs.client_tls())


async def test_client_checks_the_server_hostname(
    https_server: tuple[DriverUnderTest, Listener], certs: Certs
) -> None:
    harness, listener = https_server
    wrong_name = TLSConfig(
        ca_file=certs.ca,
        cert_file=certs.client_cert,
        key_file=certs.client_key,
        server_hostname="not-the-server.example",
    )

    with pytest.raises(ConnectError, match=f"cannot connect to {listener.url}"):
        await harness.connect(listener.url, RecordingReceiver(), tls=wrong_name)


async def test_tls_scheme_and_settings_must_agree(certs: Certs) -> None:
    driver = HttpDriver()
    with pytest.raises(ConfigError, match="an https:// listener needs a TLSConfig"):
        await driver.listen("https://127.0.0.1:0", lambda conn: RecordingReceiver())
    with pytest.raises(ConfigError, match="TLS settings given for a plain http:// URL"):
        await driver.connect("http://127.0.0.1:1", RecordingReceiver(), tls=certs.client_tls())


# --- refusals and errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://127.0.0.1", "no port"),
        ("https://:7000", "no host"),
        ("http://127.0.0.1:70000", "out of range"),
        ("http://127.0.0.1:0", "port 0 is only valid for listening"),
        ("http://127.0.0.1:7000/tensorwire/v1/connect", "only http://host:port"),
        ("http://127.0.0.1:7000?x=1", "only http://host:port"),
        ("tcp://127.0.0.1:7000", "scheme must be one of http, https"),
    ],
)
async def test_bad_url_is_a_config_error_naming_it(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        await HttpDriver().connect(url, RecordingReceiver())
    assert url in str(caught.value)


async def test_listen_on_a_taken_port_names_the_url(under_test: DriverUnderTest) -> None:
    listener = await under_test.listen()
    with pytest.raises(TransportError, match=f"cannot listen on {listener.url}: .*in use"):
        await under_test.driver.listen(
            listener.url, lambda conn: RecordingReceiver(), tls=under_test.server_tls
        )


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
    harness = make_http_under_test("http", certs, small_buffers=False)
    listener = await harness.listen()
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, listener.url + path, headers=headers) as response,
    ):
        assert response.status == status
    assert not harness.accepted
    await _closed_harness(harness)


async def test_connecting_to_a_plain_web_server_is_a_connect_error() -> None:
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_post(CONNECT_PATH, hello)
    runner = web.AppRunner(app)
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
        pass  # refused before the response headers: fine too
    else:
        await asyncio.wait_for(first.lost, 10)
        assert conn.closed
    await assert_serves(under_test, listener.url, under_test.client_tls)  # type: ignore[arg-type]


# --- through the public API -----------------------------------------------------------------------


@pytest.fixture
def http_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register HttpDriver for this test only (the lead registers it for good in
    transport/drivers/__init__.py; other tests list the known schemes)."""
    monkeypatch.setattr(
        transport.drivers, "_drivers_by_scheme", dict(transport.drivers._drivers_by_scheme)
    )
    transport.drivers.register_driver(HttpDriver())


@pytest.mark.parametrize("scheme", HTTP_KINDS)
async def test_endpoint_sends_a_state_dict_bit_exact(
    http_registered: None, certs: Certs, scheme: str
) -> None:
    from transport import Endpoint, StateDictSink

    generator = torch.Generator().manual_seed(11)
    state = {
        "embed.weight": torch.randn(512, 1024, generator=generator),  # 2 MiB
        "layer.0.weight": torch.randn(256, 1024, generator=generator).to(torch.bfloat16),
        "layer.0.bias": torch.randint(-100, 100, (1000,), dtype=torch.int64, generator=generator),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }
    tls = (certs.server_tls(), certs.client_tls()) if scheme == "https" else (None, None)
    settings = {"chunk_size": 1 << 20, "stream_window": 4 << 20}
    async with Endpoint(tls=tls[0], **settings) as server:
        url = await server.listen(f"{scheme}://127.0.0.1:0")
        async with Endpoint(tls=tls[1], **settings) as client:
            peer = await client.connect(url)

            async def receive() -> dict[str, torch.Tensor]:
                transfer = await anext(server.incoming())
                return await transfer.receive_into(StateDictSink())  # type: ignore[no-any-return]

            receiving = asyncio.ensure_future(receive())
            await peer.send_state_dict(state)
            received = await asyncio.wait_for(receiving, 30)

    assert received.keys() == state.keys()
    for name, tensor in state.items():
        assert received[name].dtype == tensor.dtype, name
        assert torch.equal(received[name], tensor), name
