"""transport.certs and `tensorwire certs`: the PKI they write works for mutual TLS over tcps://,
refuses what it should, and never clobbers existing keys."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from fl.cli_certs import certs_app
from tests.drivers.receivers import EchoReceiver, RecordingReceiver
from transport.certs import (
    CertificateFiles,
    client_tls,
    create_ca,
    create_pki,
    issue_certificate,
    server_tls,
)
from transport.drivers import DriverConnection, Listener, TcpDriver, TLSConfig
from transport.exceptions import ConfigError, ConnectError, ConnectionClosedError

LONG_AGO = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for the loopback names and two client sites."""
    directory = tmp_path / "pki"
    create_pki(directory, clients=["site-1", "site-2"])
    return directory


# --- a tcps:// echo server ----------------------------------------------------------------------


@dataclass
class EchoServer:
    listener: Listener
    accepted: list[DriverConnection] = field(default_factory=list)
    receivers: list[EchoReceiver] = field(default_factory=list)
    clients: list[DriverConnection] = field(default_factory=list)

    async def connect(self, tls: TLSConfig, receiver: RecordingReceiver) -> DriverConnection:
        conn = await TcpDriver().connect(self.listener.url, receiver, tls=tls)
        self.clients.append(conn)
        return conn


@asynccontextmanager
async def echo_server(tls: TLSConfig) -> AsyncIterator[EchoServer]:
    """A tcps listener on 127.0.0.1 that echoes every byte; aborts everything on exit."""
    server: EchoServer | None = None

    def accept(conn: DriverConnection) -> EchoReceiver:
        assert server is not None
        receiver = EchoReceiver(conn)
        server.accepted.append(conn)
        server.receivers.append(receiver)
        return receiver

    server = EchoServer(await TcpDriver().listen("tcps://127.0.0.1:0", accept, tls=tls))
    try:
        yield server
    finally:
        for conn in [*server.clients, *server.accepted]:
            conn.abort()
        for receiver in server.receivers:
            receiver.task.cancel()
        await server.listener.close()
        await asyncio.sleep(0.01)  # let connection_lost callbacks run before the loop closes


async def assert_echoed(server: EchoServer, tls: TLSConfig) -> DriverConnection:
    receiver = RecordingReceiver()
    conn = await server.connect(tls, receiver)
    await conn.send([b"ping"])
    await receiver.wait_for_bytes(4)
    assert receiver.data == b"ping"
    return conn


async def assert_refused(server: EchoServer, tls: TLSConfig) -> None:
    """Refused at connect, or (TLS 1.3 checks a client certificate after the client finished
    its handshake) dropped before anything is echoed."""
    receiver = RecordingReceiver()
    try:
        conn = await server.connect(tls, receiver)
    except ConnectError as exc:
        refusal = str(exc)
    else:
        refusal = ""
    if refusal:
        assert server.listener.url in refusal
        return
    with contextlib.suppress(ConnectionClosedError):
        await conn.send([b"let me in"])
    await receiver.wait_for(lambda: receiver.lost.done() or bool(receiver.data))
    assert not receiver.data, "the server echoed a client it should have refused"
    lost = receiver.lost.result()
    assert lost is None or isinstance(lost, ConnectionClosedError)
    with pytest.raises(ConnectionClosedError):
        await conn.send([b"let me in"])


# --- the PKI works for mutual TLS ---------------------------------------------------------------


async def test_mutual_tls_reports_the_client_name_as_peer_identity(pki: Path) -> None:
    async with echo_server(server_tls(pki)) as server:
        conn = await assert_echoed(server, client_tls(pki, "site-1"))
        await assert_echoed(server, client_tls(pki, "site-2"))

        assert [accepted.peer.peer_identity for accepted in server.accepted] == [
            "site-1",
            "site-2",
        ]
        assert conn.peer.peer_identity == "server"


async def test_client_certificate_from_another_ca_is_refused(pki: Path, tmp_path: Path) -> None:
    foreign = create_pki(tmp_path / "foreign", clients=["intruder"])["intruder"]
    # The intruder trusts our CA, so it accepts our server; our server must refuse it.
    intruder_tls = TLSConfig(
        ca_file=str(pki / "ca.pem"),
        cert_file=str(foreign.cert_file),
        key_file=str(foreign.key_file),
    )
    async with echo_server(server_tls(pki)) as server:
        await assert_refused(server, intruder_tls)
        await assert_echoed(server, client_tls(pki, "site-1"))


async def test_expired_client_certificate_is_refused(pki: Path) -> None:
    ca = CertificateFiles.named(pki, "ca")
    issue_certificate(ca, pki, "lapsed", kind="client", days=30, valid_from=LONG_AGO)

    async with echo_server(server_tls(pki)) as server:
        await assert_refused(server, client_tls(pki, "lapsed"))
        await assert_echoed(server, client_tls(pki, "site-1"))


async def test_client_refuses_an_expired_server_certificate(pki: Path) -> None:
    ca = CertificateFiles.named(pki, "ca")
    issue_certificate(ca, pki, "old-server", kind="server", days=30, valid_from=LONG_AGO)

    async with echo_server(server_tls(pki, "old-server")) as server:
        with pytest.raises(ConnectError, match=r"(?i)expired"):
            await server.connect(client_tls(pki, "site-1"), RecordingReceiver())


async def test_client_refuses_a_server_certificate_for_other_hosts(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    create_pki(pki, server_hosts=["fl.example.org", "10.0.0.5"], clients=["site-1"])

    async with echo_server(server_tls(pki)) as server:
        with pytest.raises(ConnectError, match=r"(?i)mismatch|doesn't match|not valid for"):
            await server.connect(client_tls(pki, "site-1"), RecordingReceiver())
        # The name in the certificate is accepted, even when dialling by address.
        await assert_echoed(server, client_tls(pki, "site-1", server_hostname="fl.example.org"))


# --- what the certificates contain --------------------------------------------------------------


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


ExtensionT = TypeVar("ExtensionT", bound=x509.ExtensionType)


def extension(certificate: x509.Certificate, kind: type[ExtensionT]) -> x509.Extension[ExtensionT]:
    return certificate.extensions.get_extension_for_class(kind)


def test_ca_certificate_is_a_self_signed_ec_ca(pki: Path) -> None:
    ca = load(pki / "ca.pem")

    assert ca.subject == ca.issuer
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "tensorwire local CA"
    assert extension(ca, x509.BasicConstraints).value.ca
    assert extension(ca, x509.BasicConstraints).critical
    assert extension(ca, x509.KeyUsage).value.key_cert_sign
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    ca.verify_directly_issued_by(ca)


@pytest.mark.parametrize(
    ("name", "purpose"),
    [("server", ExtendedKeyUsageOID.SERVER_AUTH), ("site-1", ExtendedKeyUsageOID.CLIENT_AUTH)],
)
def test_leaf_certificates_carry_name_purpose_and_key_ids(
    pki: Path, name: str, purpose: x509.ObjectIdentifier
) -> None:
    ca, leaf = load(pki / "ca.pem"), load(pki / f"{name}.pem")

    leaf.verify_directly_issued_by(ca)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    assert not extension(leaf, x509.BasicConstraints).value.ca
    assert extension(leaf, x509.KeyUsage).value.digital_signature
    assert not extension(leaf, x509.KeyUsage).value.key_cert_sign
    assert list(extension(leaf, x509.ExtendedKeyUsage).value) == [purpose]
    ca_key_id = extension(ca, x509.SubjectKeyIdentifier).value.digest
    assert extension(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == ca_key_id
    assert extension(leaf, x509.SubjectKeyIdentifier).value.digest != ca_key_id


def test_a_relay_certificate_serves_and_connects_with_one_key(pki: Path) -> None:
    """A relay shows the same certificate to its sites and to its upstream."""
    issue_certificate(
        CertificateFiles.named(pki, "ca"), pki, "relay-eu", kind="relay", hosts=["relay.eu"]
    )
    leaf = load(pki / "relay-eu.pem")
    leaf.verify_directly_issued_by(load(pki / "ca.pem"))
    assert list(extension(leaf, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    names = extension(leaf, x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["relay.eu"]
    assert server_tls(pki, "relay-eu").cert_file == client_tls(pki, "relay-eu").cert_file


def test_server_certificate_names_dns_names_and_ip_addresses(tmp_path: Path) -> None:
    create_pki(tmp_path, server_hosts=["fl.example.org", "10.0.0.5", "[fd00::1]"], clients=[])
    names = extension(load(tmp_path / "server.pem"), x509.SubjectAlternativeName).value

    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("fd00::1"),
    ]


def test_default_server_hosts_are_the_loopback_names(pki: Path) -> None:
    names = extension(load(pki / "server.pem"), x509.SubjectAlternativeName).value

    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_a_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    ca = create_ca(tmp_path, days=10)
    leaf = issue_certificate(ca, tmp_path, "site-1", kind="client", days=400)

    assert load(leaf.cert_file).not_valid_after_utc == load(ca.cert_file).not_valid_after_utc


def test_files_keys_are_private_and_certificates_readable(pki: Path) -> None:
    written = sorted(path.name for path in pki.iterdir())

    assert written == [
        f"{stem}.{ext}" for stem in ("ca", "server", "site-1", "site-2") for ext in ("key", "pem")
    ]
    for path in pki.iterdir():
        expected = 0o600 if path.suffix == ".key" else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# --- refusals -----------------------------------------------------------------------------------


def test_existing_files_are_not_overwritten_unless_asked(pki: Path) -> None:
    before = {path.name: path.read_bytes() for path in pki.iterdir()}

    with pytest.raises(ConfigError, match=r"ca\.pem' already exists; pass overwrite=True"):
        create_pki(pki, clients=["site-1", "site-2"])
    ca = CertificateFiles.named(pki, "ca")
    with pytest.raises(ConfigError, match=r"site-1\.pem' already exists"):
        issue_certificate(ca, pki, "site-1", kind="client")
    assert {path.name: path.read_bytes() for path in pki.iterdir()} == before

    issue_certificate(ca, pki, "site-1", kind="client", overwrite=True)
    assert (pki / "site-1.pem").read_bytes() != before["site-1.pem"]
    assert stat.S_IMODE((pki / "site-1.key").stat().st_mode) == 0o600


def test_a_refused_pki_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "site-2.key").write_text("someone's key")

    with pytest.raises(ConfigError, match=r"site-2\.key' already exists"):
        create_pki(tmp_path, clients=["site-1", "site-2"])
    assert [path.name for path in tmp_path.iterdir()] == ["site-2.key"]


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        ({"clients": ["../escape"]}, "bad certificate name '../escape'"),
        ({"clients": ["ca"]}, "client name 'ca' is reserved"),
        ({"clients": ["a", "a"]}, "client names must be distinct"),
        ({"clients": "site-1"}, "clients must be a sequence of names"),
        ({"server_hosts": ["bad host!"]}, "bad host 'bad host!'"),
        ({"server_hosts": []}, "server certificate needs at least one host"),
        ({"days": 0}, "whole number of days >= 1, got 0"),
    ],
)
def test_bad_arguments_are_config_errors_naming_the_value(
    tmp_path: Path, arguments: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        create_pki(tmp_path / "pki", **arguments)  # type: ignore[arg-type]
    assert not (tmp_path / "pki").exists() or not any((tmp_path / "pki").iterdir())


def test_issuing_needs_a_real_ca(pki: Path, tmp_path: Path) -> None:
    missing = CertificateFiles.named(tmp_path / "nowhere", "ca")
    with pytest.raises(ConfigError, match=r"cannot read '.*nowhere/ca\.pem'"):
        issue_certificate(missing, tmp_path, "site-3", kind="client")

    not_a_ca = CertificateFiles.named(pki, "site-1")
    with pytest.raises(ConfigError, match=r"site-1\.pem' is not a CA certificate"):
        issue_certificate(not_a_ca, tmp_path, "site-3", kind="client")

    wrong_key = CertificateFiles(pki / "ca.pem", pki / "site-1.key")
    with pytest.raises(ConfigError, match=r"site-1\.key' does not belong to"):
        issue_certificate(wrong_key, tmp_path, "site-3", kind="client")

    with pytest.raises(ConfigError, match="would replace the CA's own files"):
        issue_certificate(CertificateFiles.named(pki, "ca"), pki, "ca", kind="server")


def test_tls_helpers_name_a_missing_file(pki: Path) -> None:
    with pytest.raises(ConfigError, match=r"TLS file '.*site-9\.pem' does not exist"):
        client_tls(pki, "site-9")
    with pytest.raises(ConfigError, match=r"TLS file '.*nowhere/server\.pem' does not exist"):
        server_tls(pki / "nowhere")


# --- the `tensorwire certs` command -------------------------------------------------------------


def test_cli_init_writes_a_pki_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    arguments = ["init", "--out", str(out), "--client", "site-1", "--client", "site-2"]
    arguments += ["--server-host", "fl.example.org", "--days", "30"]

    first = CliRunner().invoke(certs_app, arguments)
    assert first.exit_code == 0, first.output
    assert "site-2:" in first.stdout
    for stem in ("ca", "server", "site-1", "site-2"):
        assert stat.S_IMODE((out / f"{stem}.key").stat().st_mode) == 0o600
    server = load(out / "server.pem")
    assert extension(server, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["fl.example.org"]
    ca_bytes = (out / "ca.pem").read_bytes()

    second = CliRunner().invoke(certs_app, arguments)
    assert second.exit_code == 1
    assert "ca.pem' already exists" in second.stderr
    assert (out / "ca.pem").read_bytes() == ca_bytes

    forced = CliRunner().invoke(certs_app, [*arguments, "--overwrite"])
    assert forced.exit_code == 0, forced.output
    assert (out / "ca.pem").read_bytes() != ca_bytes


def test_cli_issue_adds_certificates_from_an_existing_ca(pki: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    client = runner.invoke(certs_app, ["issue", "site-3", "--ca-dir", str(pki)])
    assert client.exit_code == 0, client.output
    server = runner.invoke(
        certs_app,
        [
            "issue",
            "edge",
            "--ca-dir",
            str(pki),
            "--kind",
            "server",
            "--host",
            "10.1.2.3",
            "--out",
            str(tmp_path / "edge"),
        ],
    )
    assert server.exit_code == 0, server.output

    ca = load(pki / "ca.pem")
    load(pki / "site-3.pem").verify_directly_issued_by(ca)
    edge = load(tmp_path / "edge" / "edge.pem")
    edge.verify_directly_issued_by(ca)
    assert list(extension(edge, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_cli_issue_without_a_ca_fails_clearly(tmp_path: Path) -> None:
    result = CliRunner().invoke(certs_app, ["issue", "site-3", "--ca-dir", str(tmp_path)])

    assert result.exit_code == 1
    assert "cannot read" in result.stderr
    assert "ca.pem" in result.stderr
