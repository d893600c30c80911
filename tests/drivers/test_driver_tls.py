"""tcps://, grpcs:// and https://: server verification, mutual TLS, peer identities, and TLS
configuration errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.drivers.conftest import TLS_KINDS, Certs, DriverUnderTest, make_driver_under_test
from tests.drivers.receivers import EchoReceiver, RecordingReceiver
from transport.drivers import TcpDriver, TLSConfig, driver_for
from transport.drivers.base import Listener
from transport.exceptions import ConfigError, ConnectError, ConnectionClosedError


@pytest.fixture(params=TLS_KINDS)
async def tls_server(
    request: pytest.FixtureRequest, certs: Certs
) -> AsyncIterator[tuple[DriverUnderTest, Listener]]:
    """An echo listener of each TLS kind that requires a client certificate from the test CA."""
    harness = make_driver_under_test(request.param, certs, small_buffers=False)
    listener = await harness.listen(EchoReceiver)
    yield harness, listener
    await harness.aclose()


async def assert_refused(harness: DriverUnderTest, url: str, tls: TLSConfig) -> None:
    """The server refuses the client: at connect, or (TLS 1.3 checks the client certificate
    after the client's handshake is done) by dropping the connection before any echo."""
    receiver = RecordingReceiver()
    try:
        conn = await harness.connect(url, receiver, tls=tls)
    except ConnectError as exc:
        refusal = str(exc)
    else:
        refusal = ""
    if refusal:
        assert url in refusal
        return
    # Asyncio reports the server's alert as an orderly close (None) or as an error.
    lost = await asyncio.wait_for(receiver.lost, 10)
    assert lost is None or isinstance(lost, ConnectionClosedError)
    assert not receiver.data
    with pytest.raises(ConnectionClosedError):
        await conn.send([b"let me in"])


async def assert_serves(harness: DriverUnderTest, url: str, tls: TLSConfig) -> None:
    receiver = RecordingReceiver()
    conn = await harness.connect(url, receiver, tls=tls)
    await conn.send([b"ping"])
    await receiver.wait_for_bytes(4)
    assert receiver.data == b"ping"
    await conn.close()


async def test_mutual_tls_reports_both_identities(
    tls_server: tuple[DriverUnderTest, Listener], certs: Certs
) -> None:
    harness, listener = tls_server
    conn = await harness.connect(listener.url, RecordingReceiver())
    await conn.send([b"x"])
    await harness.accepted_receiver()

    # grpc python does not show the client the server's certificate.
    server_identity = None if harness.kind == "grpcs" else "localhost"
    assert conn.peer.peer_identity == server_identity
    assert harness.accepted[0][0].peer.peer_identity == "site-1"
    assert harness.accepted[0][0].peer.scheme == harness.kind


@pytest.mark.parametrize("client", ["no certificate", "certificate from another CA"])
async def test_server_refuses_bad_client_and_keeps_serving(
    tls_server: tuple[DriverUnderTest, Listener], certs: Certs, client: str
) -> None:
    harness, listener = tls_server
    bad_tls = TLSConfig(ca_file=certs.ca)
    if client == "certificate from another CA":
        bad_tls = TLSConfig(
            ca_file=certs.ca,
            cert_file=certs.foreign_client_cert,
            key_file=certs.foreign_client_key,
        )

    if harness.kind == "grpcs":  # grpc finishes the handshake before the call: refused at once
        with pytest.raises(ConnectError, match=f"cannot connect to {listener.url}"):
            await harness.connect(listener.url, RecordingReceiver(), tls=bad_tls)
    else:
        await assert_refused(harness, listener.url, bad_tls)
    assert not harness.accepted
    await assert_serves(harness, listener.url, certs.client_tls())
    assert len(harness.accepted) == 1  # only the good client reached accept()


async def test_client_refuses_server_it_cannot_verify(
    tls_server: tuple[DriverUnderTest, Listener], certs: Certs
) -> None:
    harness, listener = tls_server
    no_ca = TLSConfig(cert_file=certs.client_cert, key_file=certs.client_key)  # system CAs only

    # grpc does not say why the handshake failed.
    why = "" if harness.kind == "grpcs" else ".*(?i:certificate)"
    with pytest.raises(ConnectError, match=rf"cannot connect to {listener.url}{why}"):
        await harness.connect(listener.url, RecordingReceiver(), tls=no_ca)
    await assert_serves(harness, listener.url, certs.client_tls())


async def test_client_checks_the_server_hostname(
    tls_server: tuple[DriverUnderTest, Listener], certs: Certs
) -> None:
    harness, listener = tls_server
    settings = {"ca_file": certs.ca, "cert_file": certs.client_cert, "key_file": certs.client_key}

    with pytest.raises(ConnectError, match=f"cannot connect to {listener.url}"):
        await harness.connect(
            listener.url,
            RecordingReceiver(),
            tls=TLSConfig(**settings, server_hostname="not-the-server.example"),
        )
    await assert_serves(harness, listener.url, TLSConfig(**settings, server_hostname="localhost"))


async def test_plain_tcp_client_gets_nothing_from_a_tls_server(certs: Certs) -> None:
    harness = make_driver_under_test("tcps", certs, small_buffers=False)
    listener = await harness.listen(EchoReceiver)
    plain_url = listener.url.replace("tcps://", "tcp://")
    receiver = RecordingReceiver()
    conn = await TcpDriver().connect(plain_url, receiver)
    await conn.send([b"\x00" * 64])  # not a TLS ClientHello: the server drops us

    assert isinstance(await asyncio.wait_for(receiver.lost, 10), ConnectionClosedError | None)
    assert not receiver.data
    await harness.aclose()


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"ca_file": "/nonexistent/ca.pem"}, "cannot load ca_file='/nonexistent/ca.pem'"),
        ({"cert_file": "/nonexistent/c.pem"}, "cannot load cert_file='/nonexistent/c.pem'"),
        ({"key_file": "k.pem"}, "key_file='k.pem' given without cert_file"),
    ],
)
def test_unloadable_client_settings_are_config_errors(
    settings: dict[str, str], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        TLSConfig(**settings).client_context()  # type: ignore[arg-type]


def test_server_settings_need_a_certificate_and_a_ca_for_client_certs(certs: Certs) -> None:
    with pytest.raises(ConfigError, match="needs cert_file"):
        TLSConfig(ca_file=certs.ca).server_context()
    with pytest.raises(ConfigError, match="require_client_cert=True needs ca_file"):
        TLSConfig(
            cert_file=certs.server_cert, key_file=certs.server_key, require_client_cert=True
        ).server_context()


@pytest.mark.parametrize(
    ("tls_scheme", "plain_scheme", "listener_complaint"),
    [
        ("tcps", "tcp", "a tcps:// listener needs a TLSConfig"),
        ("grpcs", "grpc", "a grpcs:// listener needs a TLSConfig"),
        ("https", "http", "an https:// listener needs a TLSConfig"),
    ],
)
async def test_tls_scheme_and_settings_must_agree(
    certs: Certs, tls_scheme: str, plain_scheme: str, listener_complaint: str
) -> None:
    driver = driver_for(f"{tls_scheme}://127.0.0.1:1")
    with pytest.raises(ConfigError, match=listener_complaint):
        await driver.listen(f"{tls_scheme}://127.0.0.1:0", lambda conn: RecordingReceiver())
    with pytest.raises(ConfigError, match=f"TLS settings given for a plain {plain_scheme}:// URL"):
        await driver.connect(
            f"{plain_scheme}://127.0.0.1:1", RecordingReceiver(), tls=certs.client_tls()
        )
    with pytest.raises(ConfigError, match=r"cannot load ca_file='/nonexistent/ca\.pem'"):
        await driver.connect(
            f"{tls_scheme}://127.0.0.1:1",
            RecordingReceiver(),
            tls=TLSConfig(ca_file="/nonexistent/ca.pem"),
        )
