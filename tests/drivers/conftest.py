"""Fixtures for the driver conformance suite: every test runs over every built-in driver kind
(memory, tcp, tcps, grpc, grpcs, http, https), on the stdlib asyncio loop and on uvloop, with
real sockets on 127.0.0.1, real grpc.aio and aiohttp servers, and real certificates."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.drivers.receivers import EchoReceiver, RecordingReceiver
from transport.drivers import (
    GrpcDriver,
    GrpcOptions,
    HttpDriver,
    HttpOptions,
    MemoryDriver,
    TcpDriver,
    TcpOptions,
    TLSConfig,
)
from transport.drivers.base import ByteReceiver, Driver, DriverConnection, Listener

KiB = 1024
MiB = 1024 * KiB
DRIVER_KINDS = ("memory", "tcp", "tcps", "grpc", "grpcs", "http", "https")
TLS_KINDS = ("tcps", "grpcs", "https")
GRPC_KINDS = ("grpc", "grpcs")
HTTP_KINDS = ("http", "https")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    """Run every driver test on both loops the drivers promise to work with."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


# --- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """Paths of a throwaway PKI: one CA with a server and a client cert, and a foreign CA."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    foreign_client_cert: str
    foreign_client_key: str

    def server_tls(self, *, require_client_cert: bool = True) -> TLSConfig:
        return TLSConfig(
            ca_file=self.ca,
            cert_file=self.server_cert,
            key_file=self.server_key,
            require_client_cert=require_client_cert,
        )

    def client_tls(self) -> TLSConfig:
        return TLSConfig(ca_file=self.ca, cert_file=self.client_cert, key_file=self.client_key)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    is_ca: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(directory: Path, stem: str, cert: x509.Certificate, key: Any) -> tuple[str, str]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server cert (CN localhost, SAN 127.0.0.1), a client cert (CN site-1), and a
    client cert from an unrelated CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _issue("tensorwire test CA", None, is_ca=True)
    server = _issue("localhost", (ca_cert.subject, ca_key))
    client = _issue("site-1", (ca_cert.subject, ca_key))
    foreign_ca, foreign_key = _issue("somebody else's CA", None, is_ca=True)
    foreign_client = _issue("intruder", (foreign_ca.subject, foreign_key))
    ca_path, _ = _write(directory, "ca", ca_cert, ca_key)
    return Certs(
        ca_path,
        *_write(directory, "server", *server),
        *_write(directory, "client", *client),
        *_write(directory, "foreign-client", *foreign_client),
    )


# --- the driver under test ----------------------------------------------------------------------


@dataclass
class DriverUnderTest:
    """One driver kind with its listen URL and TLS settings; cleans up what it opened."""

    kind: str
    driver: Driver
    listen_url: str
    server_tls: TLSConfig | None
    client_tls: TLSConfig | None
    listeners: list[Listener] = field(default_factory=list)
    connections: list[DriverConnection] = field(default_factory=list)
    accepted: list[tuple[DriverConnection, RecordingReceiver]] = field(default_factory=list)
    _accepted_changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def listen(
        self, make_receiver: Callable[[DriverConnection], RecordingReceiver] | None = None
    ) -> Listener:
        """Listen; every accepted connection and its receiver lands in `accepted`."""
        factory = make_receiver or (lambda _conn: RecordingReceiver())

        def accept(conn: DriverConnection) -> ByteReceiver:
            receiver = factory(conn)
            self.accepted.append((conn, receiver))
            self._accepted_changed.set()
            return receiver

        listener = await self.driver.listen(self.listen_url, accept, tls=self.server_tls)
        self.listeners.append(listener)
        return listener

    async def accepted_receiver(self, index: int = 0) -> RecordingReceiver:
        """The receiver of the index-th accepted connection, once it was accepted."""
        async with asyncio.timeout(10):
            while len(self.accepted) <= index:
                self._accepted_changed.clear()
                await self._accepted_changed.wait()
        return self.accepted[index][1]

    async def connect(
        self, url: str, receiver: ByteReceiver, *, tls: TLSConfig | None = None
    ) -> DriverConnection:
        conn = await self.driver.connect(url, receiver, tls=tls or self.client_tls)
        self.connections.append(conn)
        return conn

    async def aclose(self) -> None:
        connections = [*self.connections, *(conn for conn, _ in self.accepted)]
        echoes = [r.task for _, r in self.accepted if isinstance(r, EchoReceiver)]
        for conn in connections:
            conn.abort()
        for task in echoes:
            task.cancel()
        for listener in self.listeners:
            await listener.close()
        # Wait until every connection is gone and released (close() returns then, whoever
        # closed it; aiohttp's client sessions included), and the echo tasks ended, before the
        # loop closes; then one more turn for the connection_lost callbacks already scheduled.
        async with asyncio.timeout(10):
            await asyncio.gather(*(conn.close() for conn in connections), return_exceptions=True)
            await asyncio.gather(*echoes, return_exceptions=True)
        await asyncio.sleep(0)


def make_driver_under_test(kind: str, certs: Certs, *, small_buffers: bool) -> DriverUnderTest:
    """`small_buffers`: tiny high-water marks, socket buffers and HTTP/2 windows, so
    back-pressure shows after a few hundred KiB instead of tens of MiB."""
    if kind == "memory":
        driver: Driver = MemoryDriver(high_water=256 * KiB) if small_buffers else MemoryDriver()
        return DriverUnderTest(kind, driver, "memory://", None, None)
    if kind in ("tcp", "tcps"):
        driver = TcpDriver(_tcp_options(small_buffers))
    elif kind in GRPC_KINDS:
        driver = GrpcDriver(_grpc_options(small_buffers))
    else:
        driver = HttpDriver(_http_options(small_buffers))
    listen_url = f"{kind}://127.0.0.1:0"
    if kind in TLS_KINDS:
        return DriverUnderTest(kind, driver, listen_url, certs.server_tls(), certs.client_tls())
    return DriverUnderTest(kind, driver, listen_url, None, None)


def _tcp_options(small_buffers: bool) -> TcpOptions:
    if not small_buffers:
        return TcpOptions()
    return TcpOptions(
        write_high_water=256 * KiB, send_buffer_size=64 * KiB, recv_buffer_size=64 * KiB
    )


def _grpc_options(small_buffers: bool) -> GrpcOptions:
    if not small_buffers:
        return GrpcOptions(connect_timeout=5.0)
    # Tiny HTTP/2 windows and no BDP probing, so back-pressure shows after a few hundred KiB.
    return GrpcOptions(stream_window=64 * KiB, bdp_probe=False, connect_timeout=5.0)


def _http_options(small_buffers: bool) -> HttpOptions | None:
    # aiohttp does not expose the socket buffers: they stay autotuned by the kernel.
    return (
        HttpOptions(write_high_water=256 * KiB, read_buffer_size=64 * KiB)
        if small_buffers
        else None
    )


@pytest.fixture(params=DRIVER_KINDS)
async def under_test(
    request: pytest.FixtureRequest, certs: Certs
) -> AsyncIterator[DriverUnderTest]:
    """Each driver kind with default settings."""
    harness = make_driver_under_test(request.param, certs, small_buffers=False)
    yield harness
    await harness.aclose()


@pytest.fixture(params=DRIVER_KINDS)
async def small_buffered(
    request: pytest.FixtureRequest, certs: Certs
) -> AsyncIterator[DriverUnderTest]:
    """Each driver kind with tiny buffers, for back-pressure tests."""
    harness = make_driver_under_test(request.param, certs, small_buffers=True)
    yield harness
    await harness.aclose()
