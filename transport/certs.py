"""A local certificate authority for TLS and mutual TLS between tensorwire sites.

    pki = create_pki(Path("pki"), server_hosts=["fl.example.org", "10.0.0.5"], clients=["site-1"])
    server = server_tls(Path("pki"))            # presents server.pem, requires a client cert
    client = client_tls(Path("pki"), "site-1")  # presents site-1.pem, verifies against ca.pem

Everything is EC P-256 (key generation takes microseconds, handshakes are cheap) signed with
SHA-256. Files are PEM: `<name>.pem` holds the certificate, `<name>.key` the unencrypted PKCS#8
private key, created with mode 0600. Existing files are never replaced unless `overwrite=True`,
and every file is checked before the first one is written, so a refused call writes nothing.

A client certificate's subject CN is its name: the drivers report it as `PeerInfo.peer_identity`
on the server side, which is how a server tells its sites apart.

This is meant for a federation that runs its own CA (and for tests); sites that already have a
PKI point `TLSConfig` at their own files instead.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from transport.drivers import TLSConfig
from transport.exceptions import ConfigError

__all__ = [
    "DEFAULT_SERVER_HOSTS",
    "CertificateFiles",
    "CertificateKind",
    "client_tls",
    "create_ca",
    "create_pki",
    "issue_certificate",
    "server_tls",
    "tls_config_for",
]

# A relay (fl/relay.py) serves its sites and connects upstream with one certificate: both.
CertificateKind = Literal["server", "client", "relay"]
DEFAULT_SERVER_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 825
"""The longest validity that browsers and Apple platforms still accept for a leaf certificate."""
CA_NAME = "ca"
SERVER_NAME = "server"

# Backdating covers modest clock skew between the machine that issues and the one that verifies.
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?")


@dataclass(frozen=True)
class CertificateFiles:
    """Where one certificate and its private key are stored (PEM)."""

    cert_file: Path
    key_file: Path

    @classmethod
    def named(cls, directory: Path, name: str) -> CertificateFiles:
        """`<directory>/<name>.pem` and `<directory>/<name>.key`."""
        return cls(Path(directory) / f"{name}.pem", Path(directory) / f"{name}.key")


# --- issuing ------------------------------------------------------------------------------------


def create_ca(
    directory: Path,
    *,
    common_name: str = "tensorwire local CA",
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
    valid_from: datetime.datetime | None = None,
) -> CertificateFiles:
    """Create a self-signed CA as `ca.pem` / `ca.key` in `directory` (created when missing).

    `valid_from` (default: now) is the start of the validity period; a date in the past gives
    a certificate that has already expired, which is what tests of expiry need.
    """
    files = CertificateFiles.named(directory, CA_NAME)
    _refuse_to_overwrite([files], overwrite)
    _check_common_name(common_name)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _subject(common_name)
    start, end = _validity(days, valid_from)
    certificate = (
        _builder(name, name, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(files, certificate, key)
    return files


def issue_certificate(
    ca: CertificateFiles,
    directory: Path,
    name: str,
    *,
    kind: CertificateKind,
    hosts: Sequence[str] | None = None,
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
    valid_from: datetime.datetime | None = None,
) -> CertificateFiles:
    """Issue `<name>.pem` / `<name>.key` in `directory`, signed by the CA in `ca`.

    The subject CN is `name`. A server certificate lists `hosts` (DNS names and IP addresses,
    default localhost, 127.0.0.1 and ::1) as subject alternative names, which clients check
    against the host they dialled; a client certificate lists only the `hosts` given, if any.
    The validity ends `days` after `valid_from` (default now) but never after the CA's own.
    """
    _check_name(name)
    _check_kind(kind)
    files = CertificateFiles.named(directory, name)
    if _same_file(files.cert_file, ca.cert_file) or _same_file(files.key_file, ca.key_file):
        raise ConfigError(f"certificate name {name!r} would replace the CA's own files in {ca}")
    _refuse_to_overwrite([files], overwrite)
    ca_certificate, ca_key = _load_ca(ca)
    alternative_names = _alternative_names(hosts, kind)
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, valid_from)
    builder = _leaf_builder(ca_certificate, _subject(name), key, start, end, kind)
    if alternative_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names), False)
    _write_pair(files, builder.sign(ca_key, hashes.SHA256()), key)
    return files


def create_pki(
    directory: Path,
    *,
    server_hosts: Sequence[str] | None = None,
    clients: Sequence[str] = ("client",),
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
) -> dict[str, CertificateFiles]:
    """A CA, a server certificate and one client certificate per name, all in `directory`.

    Returns the files by role: "ca", "server", then each client name. Writes ca.pem, ca.key,
    server.pem, server.key, <client>.pem, <client>.key. The server certificate is valid for
    `server_hosts` (default localhost, 127.0.0.1 and ::1).
    """
    _check_client_names(clients)
    names = [CA_NAME, SERVER_NAME, *clients]
    _refuse_to_overwrite([CertificateFiles.named(directory, name) for name in names], overwrite)
    _alternative_names(server_hosts, "server")  # refuse bad hosts before the CA is written
    ca = create_ca(directory, days=days, overwrite=overwrite)
    pki = {CA_NAME: ca}
    pki[SERVER_NAME] = issue_certificate(
        ca, directory, SERVER_NAME, kind="server", hosts=server_hosts, days=days, overwrite=True
    )
    for client in clients:
        pki[client] = issue_certificate(
            ca, directory, client, kind="client", days=days, overwrite=True
        )
    return pki


def _load_ca(ca: CertificateFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read a CA certificate and its key; ConfigError naming the file that is missing or wrong."""
    certificate_pem, key_pem = _read(ca.cert_file), _read(ca.key_file)
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError as exc:
        raise ConfigError(f"{str(ca.cert_file)!r} is not a PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{str(ca.key_file)!r} is not an unencrypted PEM key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"CA key {str(ca.key_file)!r} is not an EC key")
    if key.public_key() != certificate.public_key():
        raise ConfigError(f"CA key {str(ca.key_file)!r} does not belong to {str(ca.cert_file)!r}")
    if not _is_ca(certificate):
        raise ConfigError(f"{str(ca.cert_file)!r} is not a CA certificate (BasicConstraints)")
    return certificate, key


# --- TLSConfig for the drivers ------------------------------------------------------------------


def tls_config_for(
    certificate: CertificateFiles,
    ca_file: Path,
    *,
    kind: CertificateKind,
    require_client_cert: bool = True,
    server_hostname: str | None = None,
) -> TLSConfig:
    """A TLSConfig that presents `certificate` and trusts only `ca_file`.

    A server config requires a client certificate from that CA unless `require_client_cert` is
    False (then a client certificate is still checked, and its CN reported, when offered).
    """
    _check_kind(kind)
    for path in (certificate.cert_file, certificate.key_file, ca_file):
        if not Path(path).is_file():
            raise ConfigError(f"TLS file {str(path)!r} does not exist")
    return TLSConfig(
        ca_file=str(ca_file),
        cert_file=str(certificate.cert_file),
        key_file=str(certificate.key_file),
        require_client_cert=require_client_cert and kind == "server",
        server_hostname=server_hostname if kind == "client" else None,
    )


def server_tls(
    pki_dir: Path, name: str = SERVER_NAME, *, require_client_cert: bool = True
) -> TLSConfig:
    """The TLSConfig of a server whose files `create_pki` (or `issue`) wrote into `pki_dir`."""
    return tls_config_for(
        CertificateFiles.named(pki_dir, name),
        CertificateFiles.named(pki_dir, CA_NAME).cert_file,
        kind="server",
        require_client_cert=require_client_cert,
    )


def client_tls(
    pki_dir: Path, client_name: str = "client", *, server_hostname: str | None = None
) -> TLSConfig:
    """The TLSConfig of client `client_name` from `pki_dir`, for mutual TLS."""
    return tls_config_for(
        CertificateFiles.named(pki_dir, client_name),
        CertificateFiles.named(pki_dir, CA_NAME).cert_file,
        kind="client",
        server_hostname=server_hostname,
    )


# --- certificate contents -----------------------------------------------------------------------


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    start: datetime.datetime,
    end: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _leaf_builder(
    ca_certificate: x509.Certificate,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    start: datetime.datetime,
    end: datetime.datetime,
    kind: CertificateKind,
) -> x509.CertificateBuilder:
    # A certificate cannot be trusted beyond its CA's lifetime, so do not pretend it can.
    end = min(end, ca_certificate.not_valid_after_utc)
    purposes = {
        "server": [ExtendedKeyUsageOID.SERVER_AUTH],
        "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
        "relay": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    }[kind]
    ca_key_id = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return (
        _builder(subject, ca_certificate.subject, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id.value),
            critical=False,
        )
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    # ECDHE suites need only signatures from an EC leaf key; a CA signs certificates and CRLs.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _subject(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(
    days: int, valid_from: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"certificate validity must be a whole number of days >= 1, got {days!r}")
    start = valid_from or datetime.datetime.now(datetime.UTC)
    if start.tzinfo is None:
        raise ConfigError(f"valid_from must be timezone-aware, got {start!r}")
    return start - _CLOCK_SKEW, start + datetime.timedelta(days=days)


def _alternative_names(
    hosts: Sequence[str] | None, kind: CertificateKind
) -> list[x509.GeneralName]:
    if hosts is None:
        hosts = DEFAULT_SERVER_HOSTS if kind != "client" else ()
    if isinstance(hosts, str):
        raise ConfigError(f"hosts must be a sequence of host names, got the string {hosts!r}")
    if kind != "client" and not hosts:
        raise ConfigError(f"a {kind} certificate needs at least one host name or IP address")
    return [_general_name(host) for host in hosts]


def _general_name(host: str) -> x509.GeneralName:
    """An IPAddress entry for an IP literal, a DNSName for a host name; ConfigError otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not host.isascii() or _DNS_NAME.fullmatch(host) is None or len(host) > 253:
        raise ConfigError(
            f"bad host {host!r}: expected a DNS name (ASCII, punycode for others) or an IP address"
        )
    return x509.DNSName(host.rstrip("."))


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


# --- argument checks and files ------------------------------------------------------------------


def _check_name(name: str) -> None:
    if _FILE_NAME.fullmatch(name) is None:
        raise ConfigError(
            f"bad certificate name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it becomes the file name and the CN)"
        )


def _check_client_names(clients: Sequence[str]) -> None:
    if isinstance(clients, str):
        raise ConfigError(f"clients must be a sequence of names, got the string {clients!r}")
    for client in clients:
        _check_name(client)
    reserved = {CA_NAME, SERVER_NAME}.intersection(clients)
    if reserved:
        raise ConfigError(f"client name {sorted(reserved)[0]!r} is reserved for the CA or server")
    if len(set(clients)) != len(clients):
        raise ConfigError(f"client names must be distinct, got {list(clients)}")


def _check_common_name(common_name: str) -> None:
    if not common_name or len(common_name) > 64:
        raise ConfigError(f"bad common name {common_name!r}: needs 1-64 characters")


def _check_kind(kind: str) -> None:
    if kind not in ("server", "client", "relay"):
        raise ConfigError(f"bad certificate kind {kind!r}: expected 'server', 'client' or 'relay'")


def _refuse_to_overwrite(targets: Sequence[CertificateFiles], overwrite: bool) -> None:
    if overwrite:
        return
    for files in targets:
        for path in (files.cert_file, files.key_file):
            if path.exists():
                raise ConfigError(
                    f"{str(path)!r} already exists; pass overwrite=True to replace it"
                )


def _same_file(first: Path, second: Path) -> bool:
    return Path(first).resolve() == Path(second).resolve()


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc


def _write_pair(
    files: CertificateFiles, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        files.cert_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_file(files.key_file, key_pem, mode=0o600)
        certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
        _write_file(files.cert_file, certificate_pem, mode=0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write {str(exc.filename or files.cert_file)!r}: {exc}") from exc


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write `data` with permissions `mode` from the first byte on (no window where a key is
    world-readable), replacing an existing file only through a rename."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have narrowed a certificate's mode
            handle.write(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
