"""`tensorwire certs`: create a local CA and the certificates for TLS and mutual TLS.

    tensorwire certs init --out pki --server-host fl.example.org --client site-1 --client site-2
    tensorwire certs issue site-3 --ca-dir pki

The server then listens on tcps:// with pki/server.pem + pki/server.key and trusts pki/ca.pem;
each site connects with pki/<site>.pem + pki/<site>.key and trusts pki/ca.pem. Copy only a site's
own key to that site.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

# The transport (and torch with it) loads when a command runs, not when `tensorwire` starts:
# `tensorwire health` shares this CLI and must start in a fraction of a second.
if TYPE_CHECKING:
    from transport import CertificateFiles

certs_app = typer.Typer(
    name="certs",
    help="Create a local CA and certificates for TLS and mutual TLS (tcps://, grpcs://, https://).",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_DIR = Path("pki")
DaysOption = Annotated[int, typer.Option(min=1, help="validity of each certificate in days")]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="replace existing certificate and key files")
]


class Kind(enum.StrEnum):
    """What a certificate authenticates."""

    server = "server"
    client = "client"
    relay = "relay"  # serves its sites and connects upstream with the same certificate


@certs_app.command()
def init(
    out: Annotated[
        Path, typer.Option(help="directory for the CA, server and client files")
    ] = DEFAULT_DIR,
    server_host: Annotated[
        list[str] | None,
        typer.Option(
            help="DNS name or IP the server is reached at (repeatable; default: "
            "localhost, 127.0.0.1, ::1)"
        ),
    ] = None,
    client: Annotated[
        list[str] | None,
        typer.Option(
            help="name of a client site, its certificate's CN (repeatable; default: client)"
        ),
    ] = None,
    days: DaysOption = 825,
    overwrite: OverwriteOption = False,
) -> None:
    """Create a CA (ca.pem, ca.key), a server certificate and one certificate per client."""
    from transport import ConfigError, create_pki

    try:
        pki = create_pki(
            out,
            server_hosts=server_host or None,
            clients=client or ("client",),
            days=days,
            overwrite=overwrite,
        )
    except ConfigError as exc:
        _fail(exc)
    for role, files in pki.items():
        _report(role, files)


@certs_app.command()
def issue(
    name: Annotated[str, typer.Argument(help="the certificate's name: its CN and file stem")],
    ca_dir: Annotated[
        Path, typer.Option(help="directory holding ca.pem and ca.key (from `certs init`)")
    ] = DEFAULT_DIR,
    kind: Annotated[Kind, typer.Option(help="what the certificate authenticates")] = Kind.client,
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="DNS name or IP for a server certificate (repeatable; default: "
            "localhost, 127.0.0.1, ::1)"
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="where to write the files (default: the CA directory)")
    ] = None,
    days: DaysOption = 825,
    overwrite: OverwriteOption = False,
) -> None:
    """Issue one more client or server certificate from an existing CA."""
    from transport import CertificateFiles, ConfigError, issue_certificate

    ca = CertificateFiles.named(ca_dir, "ca")
    try:
        files = issue_certificate(
            ca,
            out or ca_dir,
            name,
            kind=kind.value,
            hosts=host or None,
            days=days,
            overwrite=overwrite,
        )
    except ConfigError as exc:
        _fail(exc)
    _report(name, files)


def _report(role: str, files: CertificateFiles) -> None:
    typer.echo(f"{role}: {files.cert_file} {files.key_file}")


def _fail(exc: Exception) -> NoReturn:
    # The library speaks of its keyword argument; the person at the terminal has a flag.
    message = str(exc).replace("pass overwrite=True", "pass --overwrite")
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
