"""Admin commands against a running server: `tensorwire status`, `clients` and `abort`.

An admin connects like a site and asks over the transport's request/response channel (the one
the FL protocol's hello and heartbeats use):

    admin -> server  request  {"fl": "admin", "command": "status" | "clients" | "abort",
                               "reason": ... (abort), "token": ... (token admins)}
    server -> admin           {"fl": "admin", "command", "ok": true, "status": snapshot}
                              (fl/status.py; abort answers before the job stops)

Who may ask, by the server's config: a peer whose verified certificate name (mutual TLS) is in
`admins`, or one that presents a token of `admin_tokens` (accepted over TLS, memory:// or
loopback only: a token must not cross a network in clear). Anyone else is refused with
AdminRefused, and an admin's connection is never taken for a site. An admin without a
certificate announces itself as ADMIN_NODE_ID.

Exit statuses of the commands: 0 done; 1 the server could not be reached; 77 refused (not
admitted, or not an admin); 2 usage.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer

from fl.config import is_loopback_host
from fl.exit_codes import EXIT_FAILURE, EXIT_NOT_ADMITTED, EXIT_USAGE

if TYPE_CHECKING:  # transport (and torch) load when a command runs, not when the CLI starts
    from transport import EndpointConfig, PeerInfo, RemoteError

ADMIN = "admin"
COMMANDS = ("status", "clients", "abort")
ADMIN_NODE_ID = "tensorwire-admin"
# Schemes whose bytes no one on the path reads: an admin token may arrive over these.
PRIVATE_SCHEMES = frozenset({"tcps", "grpcs", "https", "memory"})


class AdminRefused(PermissionError):
    """The peer asking is not an admin of this server."""


# --- server side ---------------------------------------------------------------------------------


def is_admin_connection(node_id: str | None, admins: Sequence[str]) -> bool:
    """An operator's connection, not a site's: under mutual TLS the node id is the certificate's
    name (the transport refuses any other), without it an admin announces ADMIN_NODE_ID."""
    return node_id is not None and (node_id in admins or node_id == ADMIN_NODE_ID)


def authorize(
    info: PeerInfo | None,
    header: Mapping[str, Any],
    admins: Sequence[str],
    admin_tokens: Sequence[str],
) -> str:
    """Who the admin is (for the log), or AdminRefused naming what would admit it."""
    identity = info.peer_identity if info else None
    if identity is not None and identity in admins:
        return identity
    token = header.get("token")
    if isinstance(token, str) and any(_same(token, known) for known in admin_tokens):
        if not _private(info):
            raise AdminRefused("an admin token is accepted over TLS or loopback only")
        return "an admin token"
    who = f"certificate {identity!r}" if identity else "this peer (no admin certificate)"
    if isinstance(token, str):
        who += " with a token that is not an admin token"
    raise AdminRefused(
        f"{who} is not an admin of this server: its config's `admins` lists the certificate "
        "names that are, `admin_tokens` the tokens"
    )


def _same(given: str, known: str) -> bool:
    return hmac.compare_digest(given.encode(), known.encode())


def _private(info: PeerInfo | None) -> bool:
    if info is None:
        return False
    return info.scheme in PRIVATE_SCHEMES or is_loopback_host(info.address.rsplit(":", 1)[0])


def command_of(header: Mapping[str, Any]) -> str:
    command = header.get("command")
    if command not in COMMANDS:
        raise ValueError(f"unknown admin command {command!r}: one of {', '.join(COMMANDS)}")
    return str(command)


# --- client side ---------------------------------------------------------------------------------


@dataclass
class AdminSettings:
    """How an admin reaches the server: its URL and a certificate (pki_dir + name) or a token."""

    server: str
    token: str | None = None
    pki_dir: str | None = None
    name: str = ADMIN  # the certificate's name in pki_dir
    timeout: float = 10.0

    def endpoint_config(self) -> EndpointConfig:
        from transport import EndpointConfig, client_tls

        tls = client_tls(Path(self.pki_dir), self.name) if self.pki_dir else None
        node_id = self.name if self.pki_dir else ADMIN_NODE_ID
        # The token also admits the connection where the server asks for one (auth_tokens); the
        # transport sends it over TLS only, so on plain loopback it goes in the request alone.
        private = urlsplit(self.server).scheme in PRIVATE_SCHEMES
        token = self.token if private else None
        return EndpointConfig(node_id=node_id, token=token, tls=tls, idle_timeout=self.timeout)


class AdminError(Exception):
    """An admin command failed; `status` is the command's exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


async def ask(settings: AdminSettings, command: str, **fields: Any) -> dict[str, Any]:
    """Send one admin command to the server; its answer, or AdminError."""
    from transport import Endpoint, RemoteError, TensorwireError

    header: dict[str, Any] = {"fl": ADMIN, "command": command, **fields}
    if settings.token:
        _check_token_travels_safely(settings.server)
        header["token"] = settings.token
    try:
        async with Endpoint(settings.endpoint_config()) as endpoint:
            connecting = endpoint.connect(settings.server)
            peer = await asyncio.wait_for(connecting, settings.timeout)
            answer, _ = await asyncio.wait_for(peer.request(header), settings.timeout)
    except RemoteError as error:
        raise _refusal(settings, error) from None
    except (TensorwireError, OSError, TimeoutError) as error:
        reason = str(error) or type(error).__name__
        raise AdminError(f"cannot reach {settings.server}: {reason}", EXIT_FAILURE) from None
    return dict(answer)


def _refusal(settings: AdminSettings, error: RemoteError) -> AdminError:
    from transport import RemoteRequestError

    if error.code == "unauthorized":
        return AdminError(
            f"the server at {settings.server} did not admit this connection ({error}); check "
            "--token, --pki-dir and --name",
            EXIT_NOT_ADMITTED,
        )
    if isinstance(error, RemoteRequestError) and AdminRefused.__name__ in str(error):
        reason = str(error).split(": ", 1)[-1]
        return AdminError(f"the server refused: {reason}", EXIT_NOT_ADMITTED)
    return AdminError(f"the server failed the command: {error}", EXIT_FAILURE)


def _check_token_travels_safely(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in PRIVATE_SCHEMES and not is_loopback_host(parts.hostname or ""):
        raise AdminError(
            f"refusing to send the admin token in clear to {url}: use tcps://, grpcs:// or "
            "https://",
            EXIT_USAGE,
        )


# --- what the commands print ---------------------------------------------------------------------


def format_status(status: Mapping[str, Any]) -> str:
    job, memory = status["job"], status["server"]
    rounds = "?" if job["rounds"] is None else job["rounds"]
    lines = [
        f"job {job['name']}: {job['state']}" + (f" ({job['detail']})" if job["detail"] else ""),
        f"round {job['round']} of {rounds}, {job['rounds_done']} done here; "
        f"last round {_seconds(job['last_round_s'])}, mean {_seconds(job['mean_round_s'])}",
        f"sites joined: {status['clients_joined']} of {len(status['sites'])} known",
        f"server memory: RSS {_mb(memory['rss_bytes'])}, peak {_mb(memory['peak_rss_bytes'])}, "
        f"limit {_mb(memory['limit_bytes'])}",
    ]
    return "\n".join(lines)


def format_clients(status: Mapping[str, Any]) -> str:
    rows = [("site", "joined", "heartbeat", "transfer", "last error")]
    for site in status["sites"]:
        rows.append(
            (
                site["name"],
                "yes" if site["joined"] else "no",
                f"{site['heartbeat_age_s']:.1f} s ago",
                _transfer(site["transfer"]),
                site["last_error"] or "",
            )
        )
    if len(rows) == 1:
        return "no site has joined"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + row[-1]
        for row in rows
    ).rstrip()


def _transfer(transfer: Mapping[str, Any] | None) -> str:
    if transfer is None:
        return "-"
    what = "model out" if transfer["direction"] == "sent" else "result in"
    done = f"{_mb(transfer['bytes'])}/{_mb(transfer['total'])}"
    eta = "done" if transfer["finished"] else f"ETA {_seconds(transfer['eta_s'])}"
    return f"{what} {done} at {_mb(transfer['rate_bytes_s'])}/s, {eta}"


def _mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:,.1f} MB"


def _seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


# --- the commands --------------------------------------------------------------------------------

ServerOption = Annotated[
    str, typer.Option(envvar="TENSORWIRE_SERVER", help="the server's URL, e.g. tcps://host:8765")
]
TokenOption = Annotated[
    str | None, typer.Option(envvar="TENSORWIRE_ADMIN_TOKEN", help="an admin token of the server")
]
PkiOption = Annotated[
    str | None, typer.Option(help="directory with ca.pem and the admin's certificate (mTLS)")
]
NameOption = Annotated[str, typer.Option(help="the admin certificate's name in --pki-dir")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the server's answer as JSON")]
TimeoutOption = Annotated[float, typer.Option(min=0.1, help="seconds to wait for the server")]


def status(
    server: ServerOption,
    token: TokenOption = None,
    pki_dir: PkiOption = None,
    name: NameOption = ADMIN,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Show the running job: state, round, sites joined, the server's memory."""
    answer = _run(AdminSettings(server, token, pki_dir, name, timeout), "status")
    typer.echo(json.dumps(answer["status"]) if as_json else format_status(answer["status"]))


def clients(
    server: ServerOption,
    token: TokenOption = None,
    pki_dir: PkiOption = None,
    name: NameOption = ADMIN,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """List the sites: joined, last heartbeat, current transfer, last error."""
    answer = _run(AdminSettings(server, token, pki_dir, name, timeout), "clients")
    sites = answer["status"]["sites"]
    typer.echo(json.dumps(sites) if as_json else format_clients(answer["status"]))


def abort(
    server: ServerOption,
    reason: Annotated[str, typer.Option(help="told to every site")] = "aborted by an admin",
    token: TokenOption = None,
    pki_dir: PkiOption = None,
    name: NameOption = ADMIN,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Stop the job: the sites are told to stop and the server exits 0, keeping the job's state
    (started again, it continues the job)."""
    _run(AdminSettings(server, token, pki_dir, name, timeout), "abort", reason=reason)
    typer.echo(f"{server}: the job is stopping ({reason})")


def _run(settings: AdminSettings, command: str, **fields: Any) -> dict[str, Any]:
    try:
        return asyncio.run(ask(settings, command, **fields))
    except AdminError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.status) from None


def register_admin_commands(app: typer.Typer) -> None:
    """Add `status`, `clients` and `abort` to the `tensorwire` command."""
    for command in (status, clients, abort):
        app.command()(command)
